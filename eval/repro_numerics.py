"""How reproducible are the scores? Measures what the README's "Reproducibility" section states.

For SmolLM2 (fp32 and nf4, HF backend) on the test split of a small question set:
- run to run: the same batch size twice -> bit-identical? (max |diff| of log-probs, expected 0.0);
- across batch sizes (1, 8, 64): max |diff| of the top-k and candidate log-probs (padding and matmul
  shapes change the floating-point reduction order, which is what differs between machines too);
- on a CPU with avx512_bf16 only: the packed bitsandbytes kernel that `models.pin_unpacked_4bit` turns
  off, against the pinned unpacked one (the size of the cross-CPU difference the fix removes).

    .venv/bin/python eval/repro_numerics.py --max-tuples 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refine_llm import models, scoring  # noqa: E402
from refine_llm.config import QuestionsConfig, ScoringConfig  # noqa: E402
from refine_llm.prompts import load_prompt  # noqa: E402
from refine_llm.questions import build_questions  # noqa: E402


def _lp(ds) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(ds["topk_logprobs"], np.float64), np.asarray(ds["cand_logprobs"], np.float64)


def _maxdiff(a, b) -> float:
    (t1, c1), (t2, c2) = a, b
    fin = np.isfinite(c1) & np.isfinite(c2)
    return float(max(np.abs(t1 - t2).max(), np.abs(c1[fin] - c2[fin]).max() if fin.any() else 0.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tuples", type=int, default=8)
    ap.add_argument("--prompt", default="paper")
    ap.add_argument("--batch-sizes", default="1,8,64")
    a = ap.parse_args()
    ds = build_questions(QuestionsConfig(category="gender", max_tuples=a.max_tuples, seed=0))
    test = ds.select([i for i, s in enumerate(ds["split"]) if s == "test"])
    prompt = load_prompt(a.prompt)
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    out = {"cpu": models.cpu_info(), "rows": len(test)}
    for quant in ("fp32", "nf4"):
        model, tok = models.load_model(models.SMOLLM2_ALIAS, quant=quant, device="cpu")
        res = {b: _lp(scoring.score(model, tok, test, prompt, ScoringConfig(batch_size=b, prompt=a.prompt),
                                    progress=False)) for b in sizes}
        again = _lp(scoring.score(model, tok, test, prompt, ScoringConfig(batch_size=sizes[-1], prompt=a.prompt),
                                  progress=False))
        r = {"run_to_run_max_abs_diff": _maxdiff(res[sizes[-1]], again),
             "across_batch_sizes_max_abs_diff": max(_maxdiff(res[sizes[0]], res[b]) for b in sizes[1:])}
        if quant == "nf4" and out["cpu"]["avx512_bf16"]:
            for m in model.modules():  # what bitsandbytes would do on this CPU without the pin
                if hasattr(m, "support_avx512bf16_for_cpu"):
                    m.support_avx512bf16_for_cpu = True
            packed = _lp(scoring.score(model, tok, test, prompt, ScoringConfig(batch_size=sizes[-1], prompt=a.prompt),
                                       progress=False))
            r["packed_bf16_kernel_vs_pinned_max_abs_diff"] = _maxdiff(res[sizes[-1]], packed)
        out[quant] = r
        del model
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
