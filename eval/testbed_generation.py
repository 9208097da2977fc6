"""End to end in generation: do greedy answers served by vLLM (head opted in) carry the bias the report predicts?

    .venv/bin/python eval/testbed_generation.py --model testbed --head runs/<run>/heads/slot
    .venv/bin/python eval/testbed_generation.py --model ~/.cache/refine_llm/models/testbed-<key> --head DIR \\
        --names 4 --attributes 2 --out runs/testbed-generation

The testbed's stratified test sample (``refine_llm.testbed.eval_questions``; unseen names, attributes
and templates) is rendered with the ``qa`` prompt and answered twice per condition (base, and the head
when ``--head`` is given):

- **vLLM generation**: the project's launcher (``refine_llm.serving.launch``, bounded KV cache on CPU)
  starts the OpenAI server in float32 (vLLM cannot load bnb NF4) with the head in its heads directory;
  token-id prompts go to /v1/completions in concurrent batches, greedy, stop at a newline; the head is
  opted in per request (``vllm_xargs``, mode ``first``). Each answer is parsed to subject 1 / subject 2 /
  neither (``refine_llm.generation.parse_answer``).
- **HF path**: the same prompts scored once (fp32, ``refine_llm.scoring``), the head applied to the
  top-k, argmax, mapped to a subject through the candidates' first tokens.

Both become one-hot answer probabilities, and ``metrics.evaluate`` gives mean|C|, μ and η from them
(the report's formulas). Per condition the table shows generation vs HF argmax side by side, the HF
value's cluster-bootstrap 95% CI (attributes resampled, as in the report) and whether generation falls
inside it; strict specified accuracy (plain and negated questions), the rate of answers naming
neither subject, the per-prompt decision agreement and the first-token agreement. The HF path's soft
numbers (top-k renormalised probabilities, the report's headline) are added for reference.

Writes ``<out>/generation.json`` and ``<out>/generation.md`` (atomically) and prints the Markdown.
Without ``--head`` the heads directory holds only an identity head (the launcher needs one) that no
request opts into: base only.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from refine_llm import generation as G  # noqa: E402
from refine_llm import models, testbed  # noqa: E402
from refine_llm.errors import ArgumentParser, UserError  # noqa: E402

HEAD_NAME = "head"  # the served name of --head
PROMPT = "qa"  # the prompt the testbed was fine-tuned on


def _positive(s: str) -> int:
    import argparse

    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


def _parser() -> ArgumentParser:
    from refine_llm.config import SERVING_MODES

    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="testbed", help="alias or model directory (fp32/bf16 safetensors)")
    p.add_argument("--head", default=None, help="a saved head directory (runs/<run>/heads/<variant>); none: base only")
    p.add_argument("--mode", default="first", choices=SERVING_MODES, help="refine_mode of the served head")
    p.add_argument("--names", type=_positive, default=testbed.EvalSpec.names, help="test names per group")
    p.add_argument("--attributes", type=_positive, default=testbed.EvalSpec.attributes, help="test attributes")
    p.add_argument("--spec-tuples", type=_positive, default=testbed.EvalSpec.spec_tuples,
                   help="tuples whose specified questions are asked")
    p.add_argument("--seed", type=int, default=0, help="seed of the test sample and the bootstrap")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="CPU KV cache of the server (GiB; launcher default 2)")
    p.add_argument("--max-tokens", type=_positive, default=G.DEFAULT_MAX_TOKENS)
    p.add_argument("--batch-size", type=_positive, default=16, help="prompts per request")
    p.add_argument("--workers", type=_positive, default=4, help="requests in flight")
    p.add_argument("--startup-timeout", type=_positive, default=1800,
                   help="seconds to wait for the server to get healthy (a busy 2-core machine needs minutes)")
    p.add_argument("--bootstrap", type=_positive, default=1000, help="cluster-bootstrap resamples of the CIs")
    p.add_argument("--out", default="runs/testbed-generation")
    return p


def _load_head(path: str | None, model):
    if path is None:
        return None
    from refine_llm.head import load_head, tokenizer_fingerprint

    head, config = load_head(path, lm_head_weight=model[0].get_output_embeddings().weight.detach().float(),
                             expect_tokenizer_fingerprint=tokenizer_fingerprint(model[1]))
    return head


def _heads_dir(root: Path, head: str | None, tokenizer) -> Path:
    """A heads directory for the launcher: heads.json -> --head, or an identity head nobody opts into."""
    d = root / "heads"
    d.mkdir(parents=True, exist_ok=True)
    if head is not None:
        (d / "heads.json").write_text(json.dumps({HEAD_NAME: str(Path(head).resolve())}))
    else:
        from refine_llm.config import HeadConfig
        from refine_llm.head import build_head, save_head, tokenizer_fingerprint

        save_head(build_head(HeadConfig(variant="logit", k=10)), d / "identity",
                  {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)})
    return d


def _fmt(v, d: int = 3) -> str:
    return "–" if v is None else f"{v:.{d}f}"


def _markdown(res: dict) -> str:
    lines = [f"# Generation vs HF argmax on the testbed's test sample\n",
             f"model `{res['model']}` (float32), head `{res['head']}`, prompt {PROMPT}; {res['n_prompts']} prompts "
             f"({res['n_tuples']} tuples, {res['n_specified']} specified; {res['n_collision']} whose subjects share a first "
             f"token, decided on the HF path by the more probable whole name); vLLM {res['seconds']['generation']:.0f} s, "
             f"HF {res['seconds']['hf']:.0f} s, server start {res['seconds']['server_start']:.0f} s "
             f"(2 shared CPU cores, under contention).\n"]
    for cond, c in res["conditions"].items():
        g, h, ci = c["generation"], c["hf_argmax"], c["hf_argmax_ci"]
        lines += [f"## {cond}\n", "| quantity | vLLM generation | HF argmax | HF argmax 95% CI | inside CI | HF soft (report) |",
                  "|---|---|---|---|---|---|"]
        for k in G.GENERATION_KEYS:
            band = ci.get(k)
            inside = "" if band is None else ("yes" if band["low"] - 1e-9 <= g[k] <= band["high"] + 1e-9 else "**no**")
            band_s = "" if band is None else f"[{_fmt(band['low'])}, {_fmt(band['high'])}]"
            lines.append(f"| {k} | {_fmt(g[k])} | {_fmt(h[k])} | {band_s} | {inside} | {_fmt(c['hf_soft'].get(k))} |")
        lines += ["", f"decision agreement (vLLM vs HF argmax): all {c['agreement']:.3f}, underspecified "
                      f"{c['agreement_underspecified']:.3f}, specified {c['agreement_specified']:.3f}; first generated "
                      f"token = HF argmax token: {c['first_token_agreement']:.3f}\n"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from refine_llm.io import atomic_write_bytes, atomic_write_json

    out = Path(args.out)
    if args.head is not None:
        from refine_llm.head import read_head_config

        read_head_config(args.head)  # a missing or broken head fails now, not after scoring
    spec = testbed.EvalSpec(names=args.names, attributes=args.attributes, spec_tuples=args.spec_tuples, seed=args.seed)
    questions = testbed.eval_questions(spec)
    spec_rows = np.flatnonzero(np.asarray(questions["specified"], dtype=bool))
    under_rows = np.flatnonzero(~np.asarray(questions["specified"], dtype=bool))
    model_path = models.model_dir(models.resolve(args.model))

    # HF path (fp32): score once, base and head argmax
    t0 = time.perf_counter()
    model, tok = models.load_model(model_path, quant="fp32", device="cpu")
    head = _load_head(args.head, (model, tok))
    key = f"{models.fingerprint(models.resolve(model_path))}-fp32"
    scores = G.hf_scores(model, tok, questions, PROMPT, store_hidden=head is not None, progress=True,
                         cache_dir=out / "scores", model_key=key)  # a re-run reuses them
    hf = {"base": G.hf_predictions(scores)}
    if head is not None:
        hf["head"] = G.hf_predictions(scores, head)
    ids = G.prompt_token_ids(tok, questions, PROMPT)
    t_hf = time.perf_counter() - t0
    del model, head

    # vLLM generation through the project's launcher
    gen, seconds = {}, {"hf": t_hf}
    with tempfile.TemporaryDirectory(prefix="refine-gen-") as tmp:
        heads = _heads_dir(Path(tmp), args.head, tok)
        t0 = time.perf_counter()
        with G.launched_server(model_path, heads, out / "server.log", served_name="testbed", dtype="float32",
                               kv_cache_gib=args.kv_cache_gib,
                               extra=["--max-model-len", "1024", "--max-num-seqs", "32", "--enforce-eager"],
                               startup_timeout=args.startup_timeout) as url:
            seconds["server_start"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            for cond in hf:
                gen[cond] = G.generate(url, "testbed", ids, head=HEAD_NAME if cond == "head" else None, mode=args.mode,
                                       max_tokens=args.max_tokens, batch_size=args.batch_size, workers=args.workers)
            seconds["generation"] = time.perf_counter() - t0

    res = {"model": model_path, "head": args.head, "mode": args.mode, "eval_spec": asdict(spec),
           "n_prompts": len(ids), "n_tuples": None, "n_specified": int(len(spec_rows)), "seconds": seconds,
           "n_collision": int(scores.collision.sum()),
           "conditions": {}}
    for cond in hf:
        texts = [c.text for c in gen[cond]]
        d_gen = G.decisions_from_texts(texts, questions)
        d_hf = hf[cond]["decisions"]
        m_gen = G.decision_metrics(questions, d_gen, n_resamples=args.bootstrap, seed=args.seed)
        m_hf = G.decision_metrics(questions, d_hf, n_resamples=args.bootstrap, seed=args.seed)
        ci = G.level_ci(m_hf["evaluation"], n_resamples=args.bootstrap, seed=args.seed)
        soft = G.metrics.evaluate(questions, hf[cond]["p_topk"], hf[cond]["p_topk"], seed=args.seed, n_resamples=0)
        first = np.array([-1 if c.first_token_id is None else c.first_token_id for c in gen[cond]])
        res["n_tuples"] = m_gen["n_tuples"]
        res["conditions"][cond] = {
            "generation": {k: v for k, v in m_gen.items() if k != "evaluation"},
            "hf_argmax": {k: v for k, v in m_hf.items() if k != "evaluation"},
            "hf_argmax_ci": ci,
            "generation_null_mu": m_gen["evaluation"].get("null", {}).get("mu"),
            "hf_argmax_null_mu": m_hf["evaluation"].get("null", {}).get("mu"),
            "hf_soft": {"mean_abs_c": soft["mean_abs_c"], "mu": soft["mu"], "eta": soft["eta"],
                        "specified_accuracy": soft["specified_accuracy"]},
            "agreement": G.agreement(d_gen, d_hf),
            "agreement_underspecified": G.agreement(d_gen, d_hf, under_rows),
            "agreement_specified": G.agreement(d_gen, d_hf, spec_rows),
            "first_token_agreement": float(np.mean(first == hf[cond]["argmax_token_id"])),
            "examples": [{"context": questions["context"][i], "question": questions["question"][i],
                          "generated": texts[i], "decision_generation": int(d_gen[i]), "decision_hf": int(d_hf[i])}
                         for i in list(np.flatnonzero(d_gen != d_hf)[:10])],
        }
    md = _markdown(res)
    atomic_write_json(out / "generation.json", res, indent=1)
    atomic_write_bytes(out / "generation.md", md.encode())
    print(md)
    print(f"wrote {out / 'generation.json'} and {out / 'generation.md'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
