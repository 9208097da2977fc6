"""CPU-independent numerics: the loader keeps bitsandbytes' 4-bit layers on the unpacked kernel on every CPU.

bitsandbytes 0.50 packs a `Linear4bit`'s weights at its first no-grad eval forward when the module's
`support_avx512bf16_for_cpu` flag is on (set at construction on CPUs with avx512_bf16), then computes in
bf16 through a kernel without autograd. The guard test turns the flag on for every module, as such a CPU
would, so it checks the loader's switch on any CPU.
"""

from __future__ import annotations

import pytest
import torch

from refine_llm import models

import bitsandbytes  # noqa: F401  (required: a missing bitsandbytes fails, never skips)
import peft  # noqa: F401  (required: a missing peft fails, never skips)


def _lora_grads(model, ids) -> dict[str, torch.Tensor]:
    """Gradients of every LoRA parameter for a next-token loss on `ids` [B, T] (train mode, fresh .grad)."""
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits  # [B, T, V]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def test_loader_keeps_4bit_unpacked_where_the_cpu_would_pack(smollm2_dir, monkeypatch):
    import bitsandbytes as bnb
    import bitsandbytes.nn.modules as bnb_modules

    from refine_llm.baselines import lora
    from refine_llm.config import LoraConfig

    # As on an avx512_bf16 CPU: every Linear4bit is constructed with the packing flag on.
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    model, tok = models.load_model(smollm2_dir, quant="nf4", device="cpu")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 210  # 30 blocks x (q, k, v, o, gate, up, down) of SmolLM2-135M
    assert not any(m.support_avx512bf16_for_cpu for m in layers)
    packed_before = {id(m): m.weight.data.clone() for m in layers}

    peft_model = lora.add_lora(model, LoraConfig(dropout=0.0, seed=0))
    torch.manual_seed(1)  # B starts at zero: give it values so that A's gradients are non-zero too
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.02)
    ids = tok(["Mary met John at the bus stop. Who was a nurse? Answer: Mary"], return_tensors="pt").input_ids
    fresh = _lora_grads(peft_model, ids)  # before any eval forward: the unpacked path on every CPU

    peft_model.eval()
    with torch.no_grad():  # the forward that packs the weights on an avx512_bf16 CPU
        peft_model(input_ids=ids)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert all(torch.equal(m.weight.data, packed_before[id(m)]) for m in layers)

    after = _lora_grads(peft_model, ids)
    assert len(fresh) == 2 * len(layers) and fresh.keys() == after.keys()
    assert all(g.abs().sum() > 0 for g in fresh.values())
    bad = [n for n in fresh if not torch.equal(fresh[n], after[n])]
    assert not bad, f"{len(bad)} LoRA gradients changed after an eval forward, e.g. {bad[0]}"


def test_pin_unpacks_a_layer_packed_before_loading_finished():
    """A layer packed before the switch (a forward ran first) is unpacked back and leaves the bf16 kernel."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict({"weight": torch.randn(64, 64)}, strict=False)
    layer = layer.to("cpu")  # quantizes
    x = torch.randn(3, 64)
    with torch.no_grad():
        layer.support_avx512bf16_for_cpu = False
        ref = layer(x)
        shape = layer.weight.data.shape
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
            layer.weight.data, layer.weight.quant_state)
        layer.support_avx512bf16_for_cpu = True
        assert models.pin_unpacked_4bit(torch.nn.Sequential(layer)) == 1
        assert not layer.support_avx512bf16_for_cpu
        assert not layer.weight.quant_state.packing_format_for_cpu and layer.weight.data.shape == shape
        # best-effort inverse: the scales went through bf16, so equal to bf16 rounding, not bit for bit
        torch.testing.assert_close(layer(x), ref, atol=2e-2, rtol=2e-2)


def test_cpu_info_names_the_cpu_and_the_stack():
    info = models.cpu_info()
    assert info["cpu"] and info["torch"] and torch.__version__.startswith(info["torch"].split("+")[0])
    assert info["bitsandbytes"] and info["bnb_4bit_kernel"] == "unpacked"
    assert info["avx512_bf16"] in (True, False, None)
