#!/usr/bin/env python
"""The BBQ table of issue 23: every method that can run on BBQ, on one model, at a size that answers.

    python eval/bbq_table.py --run runs/qwen-steer --out runs/bbq-qwen              # 1000 items per category
    python eval/bbq_table.py --run runs/qwen-steer --out runs/bbq-qwen --categories Age   # one sitting per category

Items: ``--max-items`` per category of ``--data`` (default ../shared/bbq/data: Age, Disability_status and
Nationality, CC-BY-4.0, nyu-mll/BBQ), a stratified sample (``bbq.data.stratified_sample``: even over the 4
condition x polarity cells, every template kept; 0 = all). Every condition answers the cloze prompt
(``bbq.task``: the three options listed, each answer scored by its first token, as UnQover names are):

- ``base``: the model as it is;
- ``prompt-instruct``: the cloze prompt with the bias-avoiding instruction (``prompt_variants.add_instruction``);
- ``self-debias``: Schick et al. with the BBQ category's bias-inducing prefix (prompts/self_debias_prefixes.txt:
  age, disability, nationality), its log-probs at the base top-k ids, one extra forward per item;
- ``steer``: the steering the main job trained on UnQover (``<run>/steer``; ``--extra-methods steer``), its
  forward hooks active while the cloze prompts are scored (transfer from UnQover);
- each head the main job trained on UnQover (``<run>/heads/*``), applied at the answer slot (transfer);
- ``bbq-trained``: a logit head trained on half of BBQ's templates (``bbq.task.train_bbq_head``), reported on
  the held-out templates, next to every other condition on the same held-out items.

Scores: s_AMB, s_DIS, ambiguous and disambiguated accuracy (argmax, the authors' definitions,
``bbq.metrics``) with 95% bootstrap CIs over items. The question of the issue, per method and category: does it
halve |s_AMB| while keeping disambiguated accuracy within 1 point? ``yes`` when the whole CI of its s_AMB lies
within +-|base s_AMB|/2 and its accuracy drop is <= 1 point; ``no`` when the CI lies wholly outside that band, or
the accuracy drop is > 1 point with the CIs of the two accuracies disjoint; otherwise ``cannot tell``.

Resumable: every scoring pass is cached per fixed batch under ``<out>/scores`` (the one driver); a run that is
killed continues from its last finished batch when the same command runs again, and ``--categories`` splits the
work into sittings. Writes bbq_table.json, bbq_table.md and plots/bbq.png under ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PREFIX_CATEGORY = {"Age": "age", "Disability_status": "disability", "Nationality": "nationality",
                   "Gender_identity": "gender", "Race_ethnicity": "ethnicity", "Religion": "religion"}


def halves(base: dict, row: dict) -> str:
    """yes / no / cannot tell: does ``row`` halve |s_AMB| of ``base`` keeping disambiguated accuracy within 1
    point (see the module docstring)? ``base``/``row``: ``bbq_table`` rows (argmax scores with ``ci``)."""
    need = (base["s_amb"], base["acc_disambig"], row["acc_disambig"], row["ci"]["s_amb"]["low"],
            row["ci"]["s_amb"]["high"], row["ci"]["acc_disambig"]["high"], base["ci"]["acc_disambig"]["low"])
    if any(v is None for v in need):  # no ambiguous or no disambiguated item in the cell
        return "cannot tell"
    band = abs(base["s_amb"]) / 2
    lo, hi = row["ci"]["s_amb"]["low"], row["ci"]["s_amb"]["high"]
    drop = 100 * (base["acc_disambig"] - row["acc_disambig"])
    acc_apart = (row["ci"]["acc_disambig"]["high"] < base["ci"]["acc_disambig"]["low"])
    if drop > 1 and acc_apart:
        return "no"
    if -band <= lo and hi <= band and drop <= 1:
        return "yes"
    if lo > band or hi < -band:
        return "no"
    return "cannot tell"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="The main job's run directory on this model (its heads/ and steer/).")
    p.add_argument("--out", required=True, help="Output directory (scores cache, bbq_table.json/.md, plots/).")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "bbq" / "data"), help="BBQ jsonl directory.")
    p.add_argument("--model", default=None, help="Model (default: the run's).")
    p.add_argument("--quant", default=None, help="Quantization (default: the run's).")
    p.add_argument("--max-items", type=int, default=1000, help="Items per category (stratified; 0 = all).")
    p.add_argument("--categories", default=None, help="Comma-separated BBQ categories (default: all in --data).")
    p.add_argument("--methods", default="base,prompt-instruct,self-debias,steer,heads,bbq-trained",
                   help="Which conditions to score.")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-resamples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score-only", action="store_true", help="Score into the cache, build no table.")
    a = p.parse_args(argv)
    from refine_llm.errors import UserError

    try:
        return run(a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(a) -> int:
    import json

    from refine_llm import models
    from refine_llm.bbq import task
    from refine_llm.bbq.data import bbq_files, item_arrays, load_bbq, split_by_question_index, stratified_sample
    from refine_llm.bbq.metrics import bbq_table
    from refine_llm.bbq.run import head_name, load_heads, save_result, scoring_config
    from refine_llm.errors import UserError
    from refine_llm.method_runs import STEER_DIR, Steer
    from refine_llm.methods import Base, SelfDebias
    from refine_llm import prompt_variants as V

    t0 = time.time()
    run_dir, out = Path(a.run), Path(a.out)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    known = {"base", "prompt-instruct", "self-debias", "steer", "heads", "bbq-trained"}
    if set(methods) - known:
        raise UserError(f"--methods: unknown {', '.join(sorted(set(methods) - known))}; use some of {', '.join(known)}")
    evaluation = json.loads((run_dir / "evaluation.json").read_text()) if (run_dir / "evaluation.json").is_file() else {}
    cfg_run = evaluation.get("config", {})
    model_name = a.model or cfg_run.get("model", {}).get("name")
    quant = a.quant or (evaluation.get("model") or {}).get("quant") or "auto"
    if not model_name:
        raise UserError(f"--run {run_dir}: no evaluation.json with the run's model there; pass --model")
    bbq_files(a.data)
    cats = [c.strip() for c in a.categories.split(",")] if a.categories else None
    items = stratified_sample(load_bbq(a.data, cats), a.max_items or None, seed=a.seed)
    head_dirs = sorted(d for d in (run_dir / "heads").glob("*") if (d / "config.json").is_file()) \
        if "heads" in methods else []
    if "steer" in methods and not (run_dir / STEER_DIR / "config.json").is_file():
        raise UserError(f"--run {run_dir}: no {STEER_DIR}/ there: run the main job with --extra-methods steer, "
                        "or leave steer out of --methods")
    print(f"[bbq_table] {len(items)} items ({', '.join(sorted({it.category for it in items}))}), model {model_name} "
          f"{quant}, conditions {', '.join(methods)}", file=sys.stderr, flush=True)

    model, tok = models.load_model(model_name, quant=quant)
    key = f"{models.fingerprint(models.resolve(model_name))}-{models.summary(model)['quant']}"
    top_k = int(cfg_run.get("scoring", {}).get("top_k", 10))
    scfg = scoring_config(top_k, a.batch_size, store_hidden=True)  # the gate and contextual heads read h
    cache = out / "scores"
    timing, P, extra = {}, {}, {}

    def timed(name, fn):
        t = time.time()
        print(f"[bbq_table] scoring: {name}", file=sys.stderr, flush=True)
        r = fn()
        timing[name] = round(time.time() - t, 1)
        return r

    base = timed("base", lambda: task.score_cloze(model, tok, items, scfg, cache, key, progress=True))
    P["base"] = task.answer_probs(Base(), base)
    nohid = replace(scfg, store_hidden=False)
    if "prompt-instruct" in methods:
        tmpl = V.add_instruction(task.cloze_prompt())
        own = timed("prompt-instruct", lambda: task.score_cloze(model, tok, items, nohid, cache, key, True,
                                                                prompt=tmpl))
        P["prompt-instruct"] = task.answer_probs(Base(), own)
        extra["instruction"] = V.INSTRUCTION
    if "self-debias" in methods:
        cats_of = np.array([it.category for it in items], dtype=object)
        p_sd = np.zeros((len(items), 3))
        for c in sorted(set(cats_of)):
            idx = np.flatnonzero(cats_of == c)
            prefixes = V.prefixes_for(PREFIX_CATEGORY.get(c, c.lower()))
            sub, parts = [items[i] for i in idx], {}
            for j, pre in enumerate(prefixes):
                parts[f"self-debias#{j}"] = timed(f"self-debias {c} #{j}", lambda: task.score_cloze(
                    model, tok, sub, nohid, cache, key, True, prompt=V.with_prefix(task.cloze_prompt(), pre),
                    align_ids=base.topk_ids[idx]))
            b = base.select(idx)
            out_sd = SelfDebias().apply(b, parts)
            p_sd[idx] = np.where(b.collision[:, None], np.exp(b.cand_logprobs.astype(np.float64)), out_sd.p_full)
        P["self-debias"] = p_sd
    if "steer" in methods:
        steer = Steer(artifact=run_dir / STEER_DIR)
        s = steer.steering
        with steer.hooks(model):
            own = timed("steer", lambda: task.score_cloze(model, tok, items, nohid, cache, f"{key}-steer-{s.fingerprint}",
                                                          True))
        P["steer"] = task.answer_probs(Base(), own)
        extra["steer"] = {"layer": s.layer, "strength": s.strength, "fire_rate": s.stats["fired"] / max(1, s.stats["rows"])}
    if head_dirs:
        taken: set = set()
        heads = load_heads({head_name(str(d), taken): str(d) for d in head_dirs}, tok, top_k,
                           model.get_output_embeddings().weight.detach().float().cpu())
        for name, h in heads.items():
            P[f"head {name}"] = task.answer_probs(h, base)
    if a.score_only:
        print(f"[bbq_table] scored in {time.time() - t0:.0f} s; tables: run again without --score-only",
              file=sys.stderr)
        return 0
    A = item_arrays(items)
    res = {"n_items": len(items), "categories": sorted(set(A["category"].tolist())), "model": model_name,
           "quant": quant, "run": str(run_dir), "max_items_per_category": a.max_items, "timing": timing, **extra,
           "tables": {"cloze": {c: bbq_table(p, A, a.n_resamples, a.seed) for c, p in P.items()}}}
    if "bbq-trained" in methods:
        t = time.time()
        trained, summary = task.train_bbq_head(base, items, top_k, a.seed)
        timing["bbq-trained"] = round(time.time() - t, 1)
        _, test = split_by_question_index(items, seed=a.seed)
        pos = {it.key: i for i, it in enumerate(items)}
        te = np.array([pos[it.key] for it in test], np.int64)
        At = {k: v[te] for k, v in A.items()}
        from refine_llm.methods import HeadMethod

        held = {c: bbq_table(p[te], At, a.n_resamples, a.seed) for c, p in P.items()}
        held["bbq-trained"] = bbq_table(task.answer_probs(HeadMethod(trained, "bbq-trained"), base.select(te)), At,
                                        a.n_resamples, a.seed)
        res["tables"]["cloze_heldout"] = held
        res["bbq_trained_head"] = {k: v for k, v in summary.items() if k != "seconds"}
    res["halves"] = {tab: {c: {cat: halves(t["base"][cat], row) for cat, row in t[c].items()}
                           for c in t if c != "base"} for tab, t in res["tables"].items()}
    res["timing"]["total"] = round(time.time() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    save_result(res, out, out / "bbq_table.json", out / "bbq_table.md")
    md = ["", "## Does it halve |s_AMB| with disambiguated accuracy within 1 point?", "",
          "| table | condition | " + " | ".join(res["categories"] + (["all"] if len(res["categories"]) > 1 else []))
          + " |", "|---|---|" + "---|" * (len(res["categories"]) + (len(res["categories"]) > 1))]
    for tab, conds in res["halves"].items():
        for c, per in conds.items():
            md.append(f"| {tab} | {c} | " + " | ".join(per.values()) + " |")
    from refine_llm.bbq.report import markdown
    from refine_llm.io import atomic_write_bytes

    text = markdown(res) + "\n".join(md) + "\n"
    atomic_write_bytes(out / "bbq_table.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
