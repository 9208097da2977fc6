"""A small, cheap check that each method of issue 23 works on the real model, before the full runs.

On a few validation 4-tuples of one category (with their specified questions), it prints one row per
condition: base, prompt-instruct, self-debias and steer, each over the base pass's top-k slots (as a
head is measured): mean|C| and μ of the tuples, P(gold) share and accuracy on the specified questions,
KL(base || condition) on specified and underspecified questions, the extra forward passes per answered
prompt, and for steering its fire rates.

Steering learns its probe and vector on a few train tuples, and its layer and strength on other
validation tuples than the ones measured (``--steer-tuples``), so no number below was chosen on itself.

    nice -n 5 python eval/methods_smoke.py --model qwen2.5-coder-1.5b-instruct --quant bf16 --category gender \\
        --tuples 8 --out runs/methods-smoke

Sizes (forward passes): measured rows R = 8 x --tuples; base, instruct and each Self-Debias prefix R
each; steering: the labelled rows of --train-tuples and --steer-tuples train/validation tuples once,
8 x --steer-tuples per strength (0 included), then R. ``--methods instruct,self-debias`` runs ~200
prompts with the defaults and ``--methods steer`` ~400 (the base scores are cached in --out between runs).
``--prompt auto`` is ``chat`` when the tokenizer has a chat template, else ``qa`` (what the main job's
validation sweep picks on the instruct models we run; this script does not run that sweep).
Bad input: one line, exit 2, before any model loads.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from refine_llm.errors import ArgumentParser, UserError  # noqa: E402

METHODS = ("instruct", "self-debias", "steer")
LAMBDAS = (1.0, 5.0, 10.0)  # Self-Debias decay constants shown beside the paper's 50


def parse(argv):
    p = ArgumentParser(prog="methods_smoke.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b-instruct", help="Model alias or path.")
    p.add_argument("--quant", default="bf16", help="bf16, fp32, nf4 or int8.")
    p.add_argument("--category", default="gender", help="gender, nationality, ethnicity or religion.")
    p.add_argument("--prompt", default="auto", help="auto, chat, qa, paper or a prompt file.")
    p.add_argument("--tuples", type=int, default=8, help="Validation 4-tuples measured.")
    p.add_argument("--train-tuples", type=int, default=16, help="Train 4-tuples the steering probe and vector learn on.")
    p.add_argument("--steer-tuples", type=int, default=4, help="Other validation 4-tuples the layer and strength are chosen on.")
    p.add_argument("--strengths", default="0.5,1,2", help="Steering strengths tried (comma-separated; fractions of "
                   "the layer's mean activation norm).")
    p.add_argument("--layers", default=None, help="Candidate steering layers (comma-separated; default: the middle half).")
    p.add_argument("--all-strengths", action="store_true",
                   help="Also measure steering at each strength the sweep did not pick (R passes each).")
    p.add_argument("--max-specified", type=int, default=32, help="Specified train/validation rows fed to the probe.")
    p.add_argument("--self-debias-prefixes", default=None, help="Prefixes file (default prompts/self_debias_prefixes.txt).")
    p.add_argument("--methods", default=",".join(METHODS), help=f"Which of {', '.join(METHODS)} to run.")
    p.add_argument("--batch-size", type=int, default=16, help="Prompts per forward pass.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the tuple subsets.")
    p.add_argument("--out", default="runs/methods-smoke", help="Directory for the score cache, the steering and results.json.")
    return p.parse_args(argv)


def check(args) -> dict:
    """Everything that can be checked before a model loads; UserError names the flag."""
    from refine_llm import prompt_variants as V, prompts
    from refine_llm.config import CATEGORIES

    for flag in ("tuples", "train_tuples", "steer_tuples", "batch_size", "max_specified"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.category not in CATEGORIES:
        raise UserError(f"--category {args.category}: use one of {', '.join(CATEGORIES)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UserError(f"--methods: unknown {', '.join(bad)}; use some of {', '.join(METHODS)}")
    try:
        strengths = tuple(float(s) for s in args.strengths.split(","))
        layers = tuple(int(s) for s in args.layers.split(",")) if args.layers else None
    except ValueError:
        raise UserError(f"--strengths {args.strengths} / --layers {args.layers}: give comma-separated numbers") from None
    if args.prompt != "auto":
        prompts.load_prompt(args.prompt)
    V.prefixes_for(args.category, args.self_debias_prefixes)
    return {"methods": methods, "strengths": strengths, "layers": layers}


def _row(name, pt, passes, extra=None) -> dict:
    return {"condition": name, **{k: pt.get(k) for k in ("mean_abs_c", "mu", "gold_share", "specified_accuracy",
                                                          "kl_base", "kl_underspecified", "commitment_underspecified",
                                                          "positional_error", "answer_mass")},
            "extra_passes_per_prompt": passes, **(extra or {})}


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def run(args, opts: dict) -> dict:
    from refine_llm import method_runs as R, models, prompts, questions as Q, scoring
    from refine_llm.config import QuestionsConfig, ScoringConfig
    from refine_llm.vocab import tokenizer_fingerprint
    from refine_llm.methods.self_debias import SelfDebiasConfig, self_debias
    from refine_llm.baselines.steer import SteerConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model, tok = models.load_model(args.model, quant=args.quant, device="cpu")
    name = args.prompt if args.prompt != "auto" else ("chat" if getattr(tok, "chat_template", None) else "qa")
    prompt = prompts.load_prompt(name)
    rows = Q.question_rows(QuestionsConfig(category=args.category, seed=args.seed))
    val = [r for r in rows if r["split"] == "validation"]
    train = [r for r in rows if r["split"] == "train"]
    pick = R.tuple_subset(val, args.tuples + args.steer_tuples, args.seed)
    tids = list(dict.fromkeys(val[i]["tuple_id"] for i in pick))
    measured_t, steer_t = set(tids[: args.tuples]), set(tids[args.tuples:])
    meas = [r for r in val if r["tuple_id"] in measured_t]
    scfg = ScoringConfig(prompt=name, batch_size=args.batch_size)
    key = scoring.default_model_key(model)
    print(f"model {args.model} ({args.quant}), prompt {name}, {args.category}: {len(meas)} measured rows "
          f"({args.tuples} validation tuples); loaded in {time.time() - t0:.0f}s", file=sys.stderr)

    timing = {}
    t = time.time()
    base = scoring.score(model, tok, meas, prompt, scfg, cache_dir=out / "scores", model_key=key, progress=False)
    timing["base"] = time.time() - t
    arr = R.score_arrays(base)
    lp0, mask = arr["topk_logprobs"], arr["cand_mask"]
    table = [_row("base", R.plane_point(meas, mask, lp0, lp0), 0)]
    result = {"model": args.model, "quant": args.quant, "prompt": name, "category": args.category,
              "measured_rows": len(meas), "measured_tuples": args.tuples, "table": table, "timing_s": timing}

    if "instruct" in opts["methods"]:
        t = time.time()
        lp, template, text = R.instruct_logprobs(model, tok, meas, name, base, scfg)
        timing["instruct"] = time.time() - t
        table.append(_row("prompt-instruct", R.plane_point(meas, mask, lp0, lp), 0))
        result["instruction"] = text
    if "self-debias" in opts["methods"]:
        t = time.time()
        lp, info = R.self_debias_logprobs(model, tok, meas, prompt, base, scfg,
                                          SelfDebiasConfig(prefixes=args.self_debias_prefixes))
        timing["self-debias"] = time.time() - t
        n_pre = len(info["prefixes"][args.category])
        table.append(_row(f"self-debias (λ {info['decay']:g})", R.plane_point(meas, mask, lp0, lp), n_pre))
        for lam in LAMBDAS:  # the same prefix passes at other λ: a curve at no extra forward pass
            lp = self_debias(lp0, info["biased"], lam, info["epsilon"])
            table.append(_row(f"  self-debias at λ {lam:g}", R.plane_point(meas, mask, lp0, lp), n_pre))
        result["self_debias"] = {k: v for k, v in info.items() if k not in ("passes", "biased")}
    if "steer" in opts["methods"]:
        t = time.time()
        tr_pick = set(train[i]["tuple_id"] for i in R.tuple_subset(train, args.train_tuples, args.seed))
        tr = [r for r in train if r["tuple_id"] in tr_pick]
        sv = [r for r in val if r["tuple_id"] in steer_t]
        tr_s = scoring.score(model, tok, tr, prompt, scfg, cache_dir=out / "scores", model_key=key, progress=False)
        sv_s = scoring.score(model, tok, sv, prompt, scfg, cache_dir=out / "scores", model_key=key, progress=False)
        cfg = SteerConfig(layers=opts["layers"], strengths=opts["strengths"], strength_tuples=args.steer_tuples,
                          max_specified=args.max_specified, seed=args.seed)
        steer, rep = R.train_steering(model, tok, prompt, tr, tr_s, sv, sv_s, scfg, cfg,
                                      meta={"base_model": args.model, "category": args.category, "prompt": name,
                                            "tokenizer_fingerprint": tokenizer_fingerprint(tok)},
                                      log=lambda s: print(s, file=sys.stderr))
        steer.save_pretrained(out / "steer", card={"metrics": {"layer table": rep["layers"]}})
        lp, info = R.steered_logprobs(model, tok, meas, prompt, base, steer, scfg)
        timing["steer"] = time.time() - t
        table.append(_row(f"steer (layer {rep['layer']}, strength {rep['strength']:g})",
                          R.plane_point(meas, mask, lp0, lp), 0,
                          {k: info[k] for k in ("fire_rate_underspecified", "fire_rate_specified")}))
        result["steer"] = rep
        for s in (opts["strengths"] if args.all_strengths else ()):  # the effect at the strengths not picked
            if s != steer.strength:
                lp, info = R.steered_logprobs(model, tok, meas, prompt, base, steer.with_strength(s), scfg)
                table.append(_row(f"  steer at strength {s:g} (not chosen)", R.plane_point(meas, mask, lp0, lp), 0,
                                  {k: info[k] for k in ("fire_rate_underspecified", "fire_rate_specified")}))
        timing["steer_all_strengths"] = time.time() - t
    result["timing_s"] = {k: round(v, 1) for k, v in timing.items()}
    result["total_s"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    cols = ["condition", "mean_abs_c", "mu", "gold_share", "specified_accuracy", "kl_base", "kl_underspecified",
            "commitment_underspecified", "positional_error", "answer_mass", "extra_passes_per_prompt", "fire_rate_underspecified",
            "fire_rate_specified"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in table:
        print("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    print(f"\n{json.dumps(result['timing_s'])}; results: {out / 'results.json'}")
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        opts = check(args)
        run(args, opts)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
