"""refine_llm.forward, the one forward path of scoring and the LoRA trainer: the shared-prefix path gives the
same logits (at any positions) and the same gradients as whole prompts, on SmolLM2 fp32 and the real qa
prompt (its few-shot prefix is ~85% of every prompt).

fp32 throughout: the measured prefix vs whole difference is ~1e-5 in log-probs.
"""

from __future__ import annotations

import pytest
import torch

from refine_llm import forward
from refine_llm.prompts import load_prompt

ROWS = [  # (context, question): two lengths, so rows are padded differently on each path
    ("Mary got off the flight to visit John.", "Who was a nurse?"),
    ("John got off the flight to visit Mary.", "Who was never a nurse?"),
    ("Karen had dinner with James last night and they talked for hours about the new bus line.", "Who was a mechanic?"),
    ("James had dinner with Karen last night.", "Who was never a mechanic?"),
]


def _seqs(tok):
    prompt = load_prompt("qa")
    seqs = tok([prompt.render(c, q, tok) for c, q in ROWS], add_special_tokens=prompt.add_special_tokens)["input_ids"]
    L = forward.common_prefix_len(seqs)
    assert L > 100 and len({len(s) for s in seqs}) > 1, (L, [len(s) for s in seqs])
    return seqs, L


def test_prefix_path_equals_whole_prompts_and_lone_runs(smollm2_fp32):
    model, tok = smollm2_fp32
    seqs, L = _seqs(tok)
    pad = tok.pad_token_id
    # several positions per row (exact mode scores continuations this way), all after the prefix
    positions = [[len(s) - 3, len(s) - 1] for s in seqs]
    kv = forward.prefix_kv(model, seqs[0][:L])
    assert kv is not None and kv[0][0].shape[2] == L
    h_pre, lg_pre = forward.answer_logits(model, seqs, positions, pad_id=pad, prefix_ids=seqs[0][:L], kv=kv)
    h_all, lg_all = forward.answer_logits(model, seqs, positions, pad_id=pad)
    assert lg_pre.shape == (8, model.config.vocab_size) and lg_pre.dtype == torch.float32 and h_pre.shape[0] == 8
    lp_pre, lp_all = torch.log_softmax(lg_pre, -1), torch.log_softmax(lg_all, -1)
    torch.testing.assert_close(lp_pre, lp_all, atol=1e-4, rtol=0)
    # each row equals the model run on that prompt alone (no padding, no cache)
    with torch.no_grad():
        for i, s in enumerate(seqs[:2]):
            lone = torch.log_softmax(model(torch.tensor([s])).logits[0, positions[i]].float(), -1)
            torch.testing.assert_close(lp_pre[2 * i: 2 * i + 2], lone, atol=1e-4, rtol=0)
    # logits = lm_head(hidden)
    torch.testing.assert_close(model.get_output_embeddings()(h_pre).float(), lg_pre, atol=1e-5, rtol=0)
    # a prefix that the rows do not share is cut to what they share (here: nothing beyond the mismatch)
    other = list(seqs[0][:L])
    other[L // 2] = (other[L // 2] + 1) % model.config.vocab_size
    _, lg_cut = forward.answer_logits(model, seqs, positions, pad_id=pad, prefix_ids=other)
    torch.testing.assert_close(torch.log_softmax(lg_cut, -1), lp_all, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def peft_fp32(smollm2_dir):
    """A fresh fp32 SmolLM2 with a LoRA adapter whose B is non-zero (so it changes the prefix's KV too)."""
    from peft import LoraConfig, get_peft_model

    from refine_llm import models

    model, tok = models.load_model(smollm2_dir, quant="fp32", device="cpu")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return peft_model, tok


def test_prefix_path_gives_the_same_lora_gradients(peft_fp32):
    """The trainer's path: prefix KV computed with grad and expanded to the batch, through a PeftModel."""
    model, tok = peft_fp32
    seqs, L = _seqs(tok)
    model.train()
    outs, grads = [], []
    try:
        for prefix in (None, seqs[0][:L]):
            model.zero_grad(set_to_none=True)
            _, logits = forward.answer_logits(model, seqs, pad_id=tok.pad_token_id, prefix_ids=prefix, grad=True)
            torch.log_softmax(logits, -1)[:, :50].sum().backward()
            outs.append(logits.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    finally:
        model.eval()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == sum(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(torch.log_softmax(outs[1], -1), torch.log_softmax(outs[0], -1), atol=1e-4, rtol=0)
    for n, g0 in grads[0].items():
        scale = g0.abs().max().item()
        assert scale > 0, n
        assert (grads[1][n] - g0).abs().max().item() <= 1e-3 * scale, n
    # grad=False builds no graph
    _, lg = forward.answer_logits(model, seqs, pad_id=tok.pad_token_id, prefix_ids=seqs[0][:L])
    assert not lg.requires_grad


def test_common_prefix_len_leaves_every_row_a_token():
    assert forward.common_prefix_len([[1, 2, 3], [1, 2, 4]]) == 2
    assert forward.common_prefix_len([[1, 2], [1, 2, 3]]) == 1
    assert forward.common_prefix_len([[5], [5]]) == 0 and forward.common_prefix_len([]) == 0
