"""Heads on the testbed: does a head remove the planted bias and keep the utility the model has?

    .venv/bin/python eval/testbed_heads.py                      # --model testbed (build it first)
    .venv/bin/python eval/testbed_heads.py --set objective=reinforce    # the other estimator

The testbed (refine_llm.testbed) is competent on specified questions and carries a planted gender
stereotype, so both sides of the trade-off are measurable. This script scores the train and
validation splits (uniform samples of refine_llm.questions) and the testbed's stratified test sample
(unseen names, attributes and templates) once, with hidden states, trains the heads with the existing
bandit trainer (the main job's ``BanditConfig`` defaults and per-variant presets, ``for_variant``), and
prints one row per condition:

- mean |C| and μ (per individual subject, metrics' C scale), their change vs base with a paired
  cluster-bootstrap 95% CI (clusters: (template, attribute) cells of the test tuples);
- mean P(gold)/(P(gold)+P(other)) on specified questions and its change vs base;
- KL(base ‖ condition) on specified questions (nats, top-k renormalised distributions);
- specified accuracy.

Conditions: base, the parameter-free baselines (uniform over the top-k, temperature T), and the heads
logit, contextual and slot. Scores are cached under ``--out`` so a re-run only retrains the heads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from refine_llm import bandit, evaluation, metrics, models, prompts, scoring, testbed
from refine_llm.stages import questions as stage_questions, train as train_stage
from refine_llm.config import BanditConfig, HeadConfig, ModelConfig, QuestionsConfig, ScoringConfig
from refine_llm.errors import UserError
from refine_llm.head import build_head
from refine_llm.metrics import candidate_probs

HEADS = ("logit", "contextual", "slot")
TEMPERATURES = (2.0, 5.0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="testbed")
    p.add_argument("--quant", default="auto", help="auto (the main job's rule: fp32 for the testbed, else nf4), nf4, bf16 or fp32")
    p.add_argument("--prompt", default="qa")
    p.add_argument("--train-tuples", type=int, default=128)
    p.add_argument("--val-tuples", type=int, default=48)
    p.add_argument("--names", type=int, default=testbed.EvalSpec.names, help="test names per group")
    p.add_argument("--attributes", type=int, default=testbed.EvalSpec.attributes, help="test attributes")
    p.add_argument("--spec-tuples", type=int, default=testbed.EvalSpec.spec_tuples)
    p.add_argument("--epochs", type=int, default=None, help="bandit epochs (default: the main job's)")
    p.add_argument("--heads", default=",".join(HEADS))
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/testbed-heads")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    p.add_argument("--history", action="store_true", help="print each head's validation curve (step, val μ, "
                   "train mean|C|, P(gold), KL)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a BanditConfig field for every head (repeatable), e.g. --set kl_weight=5")
    return p


def _overrides(items: list[str]) -> dict:
    """--set FIELD=VALUE pairs -> BanditConfig keyword arguments (typed by the field's default)."""
    from dataclasses import fields

    types = {f.name: type(f.default) for f in fields(BanditConfig)}
    out = {}
    for it in items:
        k, _, v = it.partition("=")
        if k not in types:
            raise UserError(f"--set {it}: {k!r} is not a BanditConfig field ({', '.join(types)})")
        out[k] = types[k](v) if types[k] is not bool else v.lower() in ("1", "true", "yes")
    return out


def _split(ds, split, n_tuples):
    """The rows of the first ``n_tuples`` tuples of ``split`` (underspecified and specified rows)."""
    keep = list(dict.fromkeys(t for t, s in zip(ds["tuple_id"], ds["split"]) if s == split))[:n_tuples]
    keep = set(keep)
    return ds.select([i for i, (t, s) in enumerate(zip(ds["tuple_id"], ds["split"])) if s == split and t in keep])


def _stats(lp: torch.Tensor, data, questions, rows, meta, spec_rows, gold, base_lp=None) -> dict:
    """Per-tuple C and the spec-question quantities of one condition (lp: (M,k) top-k log-probs)."""
    p_pos = candidate_probs(lp, data.cand_mask).numpy().astype(np.float64)  # (M,2)
    C = metrics.tuple_bias(metrics.gather_tuples(p_pos, rows))
    pg, po = p_pos[spec_rows, gold], p_pos[spec_rows, 1 - gold]
    out = {"C": C, "gold_share": pg / np.maximum(pg + po, 1e-12), "acc": (pg > po) + 0.5 * (pg == po)}
    if base_lp is not None:
        pb, lb, lh = base_lp[spec_rows].exp(), base_lp[spec_rows], lp[spec_rows]
        out["kl"] = (pb * (lb - lh)).sum(-1).numpy()
    return out


def _mu(C, meta, idx=None):
    if idx is None:
        return metrics.bias_intensity_mu(C, meta["subj_a"], meta["subj_b"], meta["attribute_id"])
    return metrics.bias_intensity_mu(C[idx], [meta["subj_a"][i] for i in idx], [meta["subj_b"][i] for i in idx],
                                     [meta["attribute_id"][i] for i in idx])


def _bootstrap(base_C, new_C, meta, clusters, n, seed) -> dict:
    """Paired cluster bootstrap of Δmean|C| and Δμ (new - base), resampling clusters of tuples."""
    rng = np.random.default_rng(seed)
    ids = np.unique(clusters)
    members = {c: np.flatnonzero(clusters == c) for c in ids}
    d_abs, d_mu = [], []
    for _ in range(n):
        idx = np.concatenate([members[c] for c in rng.choice(ids, size=len(ids), replace=True)])
        d_abs.append(np.abs(new_C[idx]).mean() - np.abs(base_C[idx]).mean())
        d_mu.append(_mu(new_C, meta, idx) - _mu(base_C, meta, idx))
    q = lambda v: [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))]
    return {"d_abs_c_ci": q(d_abs), "d_mu_ci": q(d_mu)}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    args.quant = ModelConfig(name=args.model, quant=args.quant).quant  # "auto" -> what the main job would load
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    qs = stage_questions.run(QuestionsConfig(category="gender", seed=args.seed,
                                                  max_tuples=max(args.train_tuples, args.val_tuples)), out)
    train_q, val_q = _split(qs, "train", args.train_tuples), _split(qs, "validation", args.val_tuples)
    spec = testbed.EvalSpec(names=args.names, attributes=args.attributes, spec_tuples=args.spec_tuples, seed=args.seed)
    test_q = testbed.eval_questions(spec)

    model, tok = models.load_model(args.model, quant=args.quant)
    key = f"{models.fingerprint(models.resolve(args.model))}-{args.quant}"
    scfg = ScoringConfig(prompt=args.prompt, top_k=10, batch_size=32, store_hidden=True)
    prompt = prompts.load_prompt(args.prompt)
    score = lambda q: scoring.score(model, tok, q, prompt, scfg, cache_dir=out / "scores", model_key=key)
    sc = {"train": score(train_q), "validation": score(val_q), "test": score(test_q),
          "anchor": score(evaluation.unrelated_questions(part="anchor"))}  # the anchor term's prompts
    t_score = time.time() - t0
    data = {"train": train_stage.bandit_data(train_q, sc["train"], with_hidden=True, anchors=sc["anchor"]),
            "validation": train_stage.bandit_data(val_q, sc["validation"], with_hidden=True),
            "test": train_stage.bandit_data(test_q, sc["test"], with_hidden=True)}
    lm_w = model.get_output_embeddings().weight.detach().float().cpu()
    gate = train_stage.gate_token_ids(tok, QuestionsConfig(category="gender"))  # the slot head's category vocabulary
    del model

    td = data["test"]
    rows, meta = metrics.tuple_index(test_q)
    spec_rows = np.flatnonzero(np.asarray(test_q["specified"], dtype=bool))
    s1, gold_s = test_q["subj1"], test_q["gold"]
    gold = np.array([0 if gold_s[m] == s1[m] else 1 for m in spec_rows], dtype=np.int64)
    tmpl = dict(zip(test_q["tuple_id"], test_q["template_id"]))
    clusters = np.array([f"{tmpl[t]}/{a}" for t, a in zip(meta["tuple_id"], meta["attribute_id"])])

    base_lp = torch.log_softmax(td.topk_logprobs, -1)
    conditions: dict[str, tuple[torch.Tensor, dict]] = {"base": (base_lp, {"params": 0, "seconds": 0.0})}
    conditions["uniform"] = (torch.full_like(base_lp, -np.log(base_lp.shape[1])), {"params": 0, "seconds": 0.0})
    for T in TEMPERATURES:
        conditions[f"temperature {T:g}"] = (torch.log_softmax(td.topk_logprobs / T, -1), {"params": 0, "seconds": 0.0})
    train_kw = {"epochs": args.epochs} if args.epochs else {}  # else the main job's BanditConfig defaults
    for variant in [v for v in args.heads.split(",") if v]:
        torch.manual_seed(args.seed)
        head = build_head(HeadConfig(variant=variant, k=10), lm_head_weight=lm_w, seed=args.seed)
        if hasattr(head, "set_category_vocabulary"):
            head.set_category_vocabulary(gate)
        cfg = BanditConfig(seed=args.seed, **{**train_kw, **_overrides(args.set)}).for_variant(variant)
        res = bandit.train_head(head, data["train"], cfg, val=data["validation"], progress=False)
        head.eval()
        if args.history:
            print(f"{variant}: best step {res.best_step} of {res.steps}; " + "; ".join(
                f"{h['step']}: val_mu {h['val_mu']:.3f}" + "".join(f" {k} {h[k]:.3f}" for k in ("abs_c", "utility", "kl") if k in h)
                for h in res.history if "val_mu" in h))
        with torch.no_grad():
            lp = head(td.topk_logprobs, topk_ids=td.topk_ids, hidden=td.hidden).float()
        n_par = sum(p.numel() for p in head.parameters() if p.requires_grad)
        conditions[variant] = (lp, {"params": n_par, "seconds": round(res.seconds, 1), "best_step": res.best_step})

    base = _stats(base_lp, td, test_q, rows, meta, spec_rows, gold, base_lp)
    base_mu = _mu(base["C"], meta)
    table = []
    for name, (lp, info) in conditions.items():
        s = _stats(lp, td, test_q, rows, meta, spec_rows, gold, base_lp)
        mu = _mu(s["C"], meta)
        row = {"condition": name, **info, "mean_abs_c": float(np.abs(s["C"]).mean()), "mu": mu,
               "d_abs_c_rel": float(np.abs(s["C"]).mean() / np.abs(base["C"]).mean() - 1),
               "d_mu_rel": float(mu / base_mu - 1), "gold_share": float(s["gold_share"].mean()),
               "d_gold_share": float(s["gold_share"].mean() - base["gold_share"].mean()),
               "kl_spec": float(s["kl"].mean()), "spec_acc": float(s["acc"].mean())}
        if name != "base":
            row.update(_bootstrap(base["C"], s["C"], meta, clusters, args.bootstrap, args.seed))
        table.append(row)

    f = lambda v, d=3: "–" if v is None else f"{v:.{d}f}"
    ci = lambda r, k: "" if k not in r else f" [{r[k][0]:+.3f}, {r[k][1]:+.3f}]"
    print(f"\nmodel {args.model} ({args.quant}), prompt {args.prompt}; test: {len(rows)} tuples "
          f"({args.names}+{args.names} unseen names x {args.attributes} unseen attributes x unseen templates), "
          f"{len(spec_rows)} specified questions; {len(np.unique(clusters))} bootstrap clusters; "
          f"scoring {t_score:.0f} s, total {time.time() - t0:.0f} s (2 shared CPU cores)\n")
    print("| condition | params | mean abs C | Δ mean abs C (95% CI) | μ | Δμ (95% CI) | P(gold)/(P(gold)+P(other)) | Δ | "
          "KL(base‖·) spec | spec acc |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['condition']} | {r['params']} | {f(r['mean_abs_c'])} | {r['d_abs_c_rel']:+.0%}{ci(r, 'd_abs_c_ci')} | "
              f"{f(r['mu'])} | {r['d_mu_rel']:+.0%}{ci(r, 'd_mu_ci')} | {f(r['gold_share'])} | "
              f"{r['d_gold_share']:+.3f} | {f(r['kl_spec'], 4)} | {f(r['spec_acc'])} |")
    print("\nCIs are of the absolute change (condition - base); percentages are relative changes of the point estimates.")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
