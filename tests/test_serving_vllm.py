"""vLLM logits processors (refine_llm.serving.vllm): fake batches, HF parity, and a real server.

- Unit tests drive the processors with real vLLM objects (BatchUpdate, VllmConfig, LogitsContext)
  on a toy vocabulary: adds, removes, moves/swaps, rows that did not opt in stay bit for bit.
- ``test_parity_with_hf``: one offline ``LLM`` (SmolLM2, float32, processed logprobs) against the
  HF processor on the same token ids; the engine is shut down before the test returns.
- ``test_openai_server``: the session's server (``scripts/serve.py`` on 127.0.0.1, the ``vllm_server``
  fixture of conftest.py, shared with test_soak.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import vllm  # noqa: F401  (required: a missing vllm fails, never skips)

from vllm import SamplingParams  # noqa: E402
from vllm.config import VllmConfig  # noqa: E402
from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor.interface import (  # noqa: E402
    LogitsContext,
    LogitsProcRequestState,
)

from refine_llm.config import HeadConfig  # noqa: E402
from refine_llm.head import build_head, save_head  # noqa: E402
from refine_llm.serving.vllm import (  # noqa: E402
    RefineHeadLogitsProcessor,
    RefineHeadLogitsProcessorV1,
    RefineHeadLogitsProcessorV2,
)

from conftest import SERVED_MODEL, log_tail  # noqa: E402
from test_serving_hf import K, PROMPTS  # noqa: E402

pytestmark = pytest.mark.vllm  # every test here imports vLLM's processor interfaces

V, KT = 32, 4  # toy vocabulary and top-k
GATE = [0, 1, 2]  # toy category vocabulary


@pytest.fixture
def toy_heads(tmp_path, monkeypatch):
    """$REFINE_HEADS_DIR with 'swap' (gate_token_ids GATE) and 'nogate' (none), k=4."""
    for name, meta in (("swap", {"gate_token_ids": GATE}), ("nogate", {})):
        head = build_head(HeadConfig(variant="logit", k=KT))
        with torch.no_grad():
            head.out.weight.copy_(torch.eye(KT)[[1, 0, 2, 3]])  # swap the two best tokens
        save_head(head, tmp_path / "heads" / name, meta)
    monkeypatch.setenv("REFINE_HEADS_DIR", str(tmp_path / "heads"))
    return tmp_path / "heads"


def _params(**extra) -> SamplingParams:
    return SamplingParams(max_tokens=4, extra_args=extra or None)


def _logits(n: int, seed: int = 0, best=(5, 6)) -> torch.Tensor:
    """(n,V) logits whose best two tokens are ``best`` (outside the gate unless chosen)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g)
    z[:, best[0]] += 10
    z[:, best[1]] += 9
    return z


def _changed(before: torch.Tensor, after: torch.Tensor) -> list[bool]:
    return [not torch.equal(a, b) for a, b in zip(before, after)]


def test_v1_adds_removes_moves_and_untouched_rows(toy_heads):
    proc = RefineHeadLogitsProcessor(VllmConfig(), torch.device("cpu"), False)
    assert isinstance(proc, RefineHeadLogitsProcessorV1) and not proc.is_argmax_invariant()
    out0: list[int] = []
    out2: list[int] = []
    proc.update_state(BatchUpdate(
        batch_size=3, removed=[], moved=[],
        added=[
            (0, _params(refine_head="swap", refine_mode="first"), [1, 2], out0),
            (1, _params(), [1, 2], []),  # did not opt in
            (2, _params(refine_head="swap", refine_mode="all"), [1, 2], out2),
        ],
    ))
    z = _logits(3)
    after = proc.apply(z.clone())
    assert _changed(z, after) == [True, False, True]
    assert after[0].argmax() == 6 and after[2].argmax() == 6  # swapped
    torch.testing.assert_close(after[0].logsumexp(-1), z[0].logsumexp(-1))  # same normaliser

    out0.append(6)  # vLLM appends generated tokens in place: row 0 is past its first token
    out2.append(6)
    after = proc.apply(z.clone())
    assert _changed(z, after) == [False, False, True]

    proc.update_state(None)  # no change in the batch
    # swap 0 <-> 2: the 'all' request now sits at index 0
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=[], moved=[(0, 2, MoveDirectionality.SWAP)]))
    after = proc.apply(z.clone())
    assert _changed(z, after) == [True, False, False]

    # remove index 0 ('all'), then move 2 -> 0 one way (condense), add a new 'all' at 1
    out_new: list[int] = []
    proc.update_state(BatchUpdate(
        batch_size=2, removed=[0], added=[(1, _params(refine_head="swap", refine_mode="all"), [3], out_new)],
        moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)],
    ))
    assert set(proc.rows) == {0, 1} and proc.rows[0].output_tok_ids is out0
    after = proc.apply(z[:2].clone())
    assert _changed(z[:2], after) == [False, True]

    # a request that does not opt in replaces index 1; then the 'first' one leaves: nothing is active
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[(1, _params(), [3], [])], moved=[]))
    proc.update_state(BatchUpdate(batch_size=1, removed=[0], added=[], moved=[]))
    assert proc.rows == {}
    z1 = z[:1].clone()
    assert proc.apply(z1) is z1 and torch.equal(z1, z[:1])


def test_v1_gated_mode(toy_heads):
    proc = RefineHeadLogitsProcessor(VllmConfig(), torch.device("cpu"), False)
    proc.update_state(BatchUpdate(batch_size=2, removed=[], moved=[], added=[
        (0, _params(refine_head="swap", refine_mode="gated"), None, []),
        (1, _params(refine_head="swap", refine_mode="gated"), None, []),
    ]))
    z = torch.cat([_logits(1, best=(0, 1)), _logits(1, best=(5, 6))])  # row 0: 2 gate tokens in top-4
    after = proc.apply(z.clone())
    assert _changed(z, after) == [True, False]
    assert after[0].argmax() == 1


def test_validate_params_messages(toy_heads):
    validate = RefineHeadLogitsProcessor.validate_params
    validate(_params())  # not opted in
    validate(_params(refine_head="swap"))  # default mode: first
    validate(_params(refine_head="swap", refine_mode="gated"))
    cases = [
        ({"refine_head": "gendre"}, "Available: nogate, swap"),
        ({"refine_head": "swap", "refine_mode": "sometimes"}, "first, gated, all"),
        ({"refine_head": 3}, "must be a head name"),
        ({"refine_mode": "all"}, "without refine_head"),
        ({"refine_head": "swap", "refine_mdoe": "all"}, "Did you mean 'refine_mode'"),
        ({"refine_head": "nogate", "refine_mode": "gated"}, "no gate_token_ids"),
    ]
    for extra, msg in cases:
        with pytest.raises(ValueError, match=msg):
            validate(_params(**extra))


def test_registered_twice_applies_once(toy_heads):
    cfg = VllmConfig()
    a = RefineHeadLogitsProcessor(cfg, torch.device("cpu"), False)
    b = RefineHeadLogitsProcessor(cfg, torch.device("cpu"), False)  # entry point + --logits-processors
    assert not a.inert and b.inert
    upd = BatchUpdate(batch_size=1, removed=[], moved=[], added=[(0, _params(refine_head="swap"), None, [])])
    a.update_state(upd)
    b.update_state(upd)
    z = _logits(1)
    once = a.apply(z.clone())
    assert torch.equal(b.apply(once.clone()), once)


class _HostDevice:
    """Stand-in for vLLM's UvaBackedTensor (needs pinned memory, so CUDA): .np on host, .gpu on device."""

    def __init__(self, values):
        self.np = np.asarray(values, dtype=np.int32)
        self.gpu = torch.from_numpy(self.np)


def test_v2_add_request_and_ctx(toy_heads):
    n = 8
    prompt_len = _HostDevice([5, 7, 3, 4, 0, 0, 0, 0])
    states = LogitsProcRequestState(
        device=torch.device("cpu"), max_num_reqs=n, vocab_size=V, all_token_ids=None,
        prompt_len=prompt_len, prefill_len=prompt_len, total_len=None,
    )
    proc = RefineHeadLogitsProcessor(VllmConfig(), states)
    assert isinstance(proc, RefineHeadLogitsProcessorV2)
    assert proc.add_request(0, _params(refine_head="swap", refine_mode="first"))
    assert not proc.add_request(1, _params())
    assert proc.add_request(2, _params(refine_head="nogate", refine_mode="all"))
    assert proc.add_request(3, _params(refine_head="swap", refine_mode="gated"))

    def ctx(slots, pos):
        slots_t = torch.tensor(slots, dtype=torch.int32)
        return LogitsContext(
            expanded_idx_mapping=slots_t, idx_mapping=slots_t, idx_mapping_np=np.array(slots, dtype=np.int32),
            expanded_local_pos=torch.zeros(len(slots), dtype=torch.int32),
            input_ids=torch.zeros(len(slots), dtype=torch.int32), pos=torch.tensor(pos, dtype=torch.int64),
            seq_lens_upper_bound_np=np.array(pos, dtype=np.int32) + 1,
        )

    # batch order differs from slot order; slot 0 at its first token (pos + 1 == prompt_len 5)
    z = torch.cat([_logits(3), _logits(1, best=(1, 2))])  # the gated row has 2 gate tokens
    after = proc.apply(z.clone(), ctx([2, 1, 0, 3], [9, 6, 4, 3]))
    assert _changed(z, after) == [True, False, True, True]
    # next step: slot 0 is past its first token; slot 1 (not opted in) untouched
    after = proc.apply(z.clone(), ctx([2, 1, 0, 3], [10, 7, 5, 4]))
    assert _changed(z, after) == [True, False, False, True]
    # slot 2 is recycled by a request that does not opt in: its state is reset
    assert not proc.add_request(2, _params())
    zz = z[1:2].clone()
    assert proc.apply(zz, ctx([1], [8])) is zz and torch.equal(zz, z[1:2])


# ---------------------------------------------------------------------------------------------
# one real engine: parity with the HF processor


@pytest.fixture(scope="module")
def smollm2_heads(served_heads_dir):
    """A heads directory with 'gender' (the swap head of test_serving_hf) for SmolLM2's tokenizer."""
    return served_heads_dir


def _engine_env(monkeypatch, heads: Path) -> None:
    monkeypatch.setenv("REFINE_HEADS_DIR", str(heads))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.mark.slow
def test_parity_with_hf(smollm2_dir, smollm2_fp32, smollm2_heads, monkeypatch):
    from transformers import LogitsProcessorList
    from vllm import LLM

    from refine_llm.serving.hf import RefineHeadProcessor

    model, tok = smollm2_fp32
    ids = [tok(p, add_special_tokens=True)["input_ids"] for p in PROMPTS]
    names = ("gender", "slot")  # a rank head and the slot head (identity codes + logits-row context)

    # HF: the processor's output at the first generated token, per prompt (no padding)
    hf_lp, hf_greedy = {n: [] for n in names}, {n: [] for n in names}
    for name in names:
        proc = RefineHeadProcessor(smollm2_heads / name, mode="first", tokenizer=tok)
        for row in ids:
            x = torch.tensor([row])
            with torch.no_grad():
                z = model(input_ids=x).logits[:, -1].float()
            proc.reset()
            s = LogitsProcessorList([proc])(x, z)
            hf_lp[name].append(s.log_softmax(-1)[0])
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False,
                                 logits_processor=LogitsProcessorList([proc]), pad_token_id=tok.pad_token_id)
            proc.reset()
            hf_greedy[name].append(out[0, len(row):].tolist())

    _engine_env(monkeypatch, smollm2_heads)
    llm = LLM(model=smollm2_dir, dtype="float32", max_model_len=1024, logprobs_mode="processed_logprobs",
              enforce_eager=True, seed=0, max_num_seqs=8)
    try:
        prompts = [{"prompt_token_ids": r} for r in ids]
        on = {n: SamplingParams(temperature=0, max_tokens=3, logprobs=K,
                                extra_args={"refine_head": n, "refine_mode": "first"}) for n in names}
        off = SamplingParams(temperature=0, max_tokens=3, logprobs=K)
        res_on = {n: llm.generate(prompts, on[n], use_tqdm=False) for n in names}
        res_off = llm.generate(prompts, off, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm

    for name in names:
        worst = 0.0
        for b, (r_on, r_off) in enumerate(zip(res_on[name], res_off)):
            first = r_on.outputs[0].logprobs[0]  # token id -> Logprob, processed (after the head)
            for tid, lp in first.items():
                worst = max(worst, abs(lp.logprob - float(hf_lp[name][b][tid])))
            assert list(r_on.outputs[0].token_ids) == hf_greedy[name][b], f"{name}, prompt {b}: greedy answers differ"
            if name == "gender":
                top_off = sorted(r_off.outputs[0].logprobs[0].items(), key=lambda kv: -kv[1].logprob)
                assert r_on.outputs[0].token_ids[0] == top_off[1][0], "the swap head must pick the runner-up"
            else:  # the slot head moves the first-token distribution
                off_lp = {t: v.logprob for t, v in r_off.outputs[0].logprobs[0].items()}
                assert any(abs(lp.logprob - off_lp.get(tid, lp.logprob)) > 1e-3 for tid, lp in first.items())
        print(f"parity HF vs vLLM ({name}), first-token debiased log-probs (top-{K}): max |diff| = {worst:.2e}")
        assert worst < 1e-3, (name, worst)


# ---------------------------------------------------------------------------------------------
# one real server: the session's scripts/serve.py (tests/conftest.py `vllm_server`, shared with test_soak)


def _complete(base: str, prompt: str, xargs: dict | None = None):
    import requests

    body = {"model": SERVED_MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": K,
            "return_tokens_as_token_ids": True}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return requests.post(base + "/v1/completions", json=body, timeout=60)


def _first_logprobs(resp) -> dict[str, float]:
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["logprobs"]["top_logprobs"][0]


@pytest.mark.slow
def test_openai_server(vllm_server, smollm2_heads):
    from concurrent.futures import ThreadPoolExecutor

    from refine_llm.serving import load_served_head

    base, proc, log = vllm_server
    head = load_served_head(smollm2_heads / "gender").head
    xargs = {"refine_head": "gender", "refine_mode": "first"}
    before = [_first_logprobs(_complete(base, p)) for p in PROMPTS]

    for p, b in zip(PROMPTS, before):
        on = _first_logprobs(_complete(base, p, xargs))
        assert on != b
        # the head applied exactly once: expected = top-k mass + head(top-k) from the plain request
        toks = sorted(b, key=b.get, reverse=True)
        vals = torch.tensor([[b[t] for t in toks]])
        expect = (vals.logsumexp(-1, keepdim=True) + head(vals))[0]
        for t, e in zip(toks, expect.tolist()):
            assert math.isclose(on[t], e, abs_tol=1e-3), (t, on[t], e)
        assert max(on, key=on.get) == toks[1]  # the answer changed to the runner-up

    bad = [
        {"refine_head": "nope"},
        {"refine_head": "gender", "refine_mode": "sometimes"},
        {"refine_head": 7},
        {"refine_mode": "all"},
    ]
    for x in bad:
        r = _complete(base, PROMPTS[0], x)
        assert r.status_code == 400, (x, r.status_code, r.text)
        assert "refine_" in r.text
    assert proc.poll() is None, f"server died:\n{log_tail(log)}"

    # mixed concurrent batch: opted-out rows equal the earlier plain requests
    jobs = [(p, None) for p in PROMPTS] + [(p, xargs) for p in PROMPTS]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda j: _complete(base, *j), jobs))
    for b, r in zip(before, results[: len(PROMPTS)]):
        got = _first_logprobs(r)
        assert got.keys() == b.keys() and all(math.isclose(got[t], b[t], abs_tol=1e-4) for t in b), (got, b)
    after = _first_logprobs(_complete(base, PROMPTS[0]))
    assert after == before[0], "a plain request after the others must be unchanged"
    assert "another tokenizer" not in log_tail(log, 200)
