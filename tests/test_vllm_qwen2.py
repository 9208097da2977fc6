"""The vLLM scoring path on the default model's architecture (Qwen2: grouped KV heads, biased q/k/v
projections, untied output embedding at this size), against an fp32 HF reference.

The embedded default, Qwen2.5-Coder-1.5B-Instruct, scores at about one prompt per second on 2 AVX2 cores,
so the suite checks its architecture on a 2-layer Qwen2 built from a config with random weights (and
SmolLM2's tokenizer, so that the prompts tokenize as real text); vLLM runs the same Qwen2 model code on it
as on the 1.5B model. The tolerance is the SmolLM2 backend test's (tests/test_vllm_backend.py)."""

from __future__ import annotations

import numpy as np
import pytest

from refine_llm.scoring.backends import vllm as vb

pytestmark = [pytest.mark.model, pytest.mark.vllm]

LP_TOL = 1e-3
K = 5
ENGINE_KW = dict(max_model_len=512, enforce_eager=True, kv_cache_memory_bytes=1 << 28)
PROMPTS = [
    "Fill in the blank. Mary and John got off the flight to visit. Who was a nurse? Answer:",
    "Fill in the blank. John and Mary got off the flight to visit. Who was a nurse? Answer:",
    "Aisha met Omar at the bus stop. Who can never be a doctor? Answer:",
    "The capital of France is",
    "1, 2, 3, 4,",
]


@pytest.fixture(scope="module")
def tiny_qwen2_dir(smollm2_fp32, tmp_path_factory):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _, tok = smollm2_fp32
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,  # head_dim 128, as the 1.5B
                      tie_word_embeddings=False, initializer_range=0.2, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # Qwen2's q/k/v projections carry biases (zero at init): make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.2)
    out = tmp_path_factory.mktemp("tiny_qwen2") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out), model.eval(), tok


def test_vllm_matches_hf_on_the_qwen2_architecture(tiny_qwen2_dir):
    import torch

    path, model, tok = tiny_qwen2_dir
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    with torch.no_grad():
        ref = np.stack([torch.log_softmax(model(torch.tensor([p])).logits[0, -1].float(), -1).numpy() for p in ids])
    assert (ref.max(axis=1) > -np.log(ref.shape[1]) + 4).all()  # far from uniform: a mixed-up position would show
    cand = [[[tok(" Mary", add_special_tokens=False)["input_ids"][0]], [tok(" John", add_special_tokens=False)["input_ids"][0]]]
            for _ in ids]
    llm = vb.make_llm(path, "float32", max_model_len=ENGINE_KW["max_model_len"],
                      **{k: v for k, v in ENGINE_KW.items() if k != "max_model_len"})
    try:  # its own engine, shut down here: the session's SmolLM2 engine stays as it is
        res = vb.score_token_ids_vllm(path, ids, cand, K, dtype="float32", llm=llm)
    finally:
        vb.shutdown_llm(llm)
    worst = 0.0
    for m in range(len(ids)):
        got_ids, got_lp = res["topk_ids"][m], res["topk_logprobs"][m]
        kth = np.sort(ref[m])[-K]
        assert (ref[m][got_ids] >= kth - LP_TOL).all(), f"prompt {m}: {got_ids} vs HF {np.argsort(-ref[m])[:K]}"
        worst = max(worst, float(np.abs(got_lp - ref[m][got_ids]).max()),
                    float(np.abs(res["cand_logprobs"][m] - ref[m][[c[0] for c in cand[m]]]).max()))
    print(f"\nvLLM vs HF fp32 on Qwen2: max |dlogprob| = {worst:.2e}")
    assert worst < LP_TOL, worst
