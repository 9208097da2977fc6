"""Hub-native heads: save_pretrained/from_pretrained round trip with a model card, and a hub repo id resolved
offline from the local hub cache (huggingface_hub's layout: models--org--name/refs/main +
snapshots/<revision>/), through load_head, the HF processor and a heads.json of the serving directory.
No network: only the local cache layout can be tested here (pushing needs a hub account)."""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import pytest
import torch

from refine_llm.config import HeadConfig
from refine_llm.errors import UserError
from refine_llm.head import HubHeadMixin, LogitHead, PaperHead, build_head, load_head, tokenizer_fingerprint

K = 6
REV = "0123456789abcdef0123456789abcdef01234567"


def _trained_head() -> LogitHead:
    head = build_head(HeadConfig(variant="logit", k=K))
    with torch.no_grad():
        head.out.weight.add_(0.1 * torch.randn(K, K, generator=torch.Generator().manual_seed(0)))
    return head


def _meta(fp="sha256:abc"):
    return {"base_model": "SmolLM2-135M-Instruct", "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "tokenizer_fingerprint": fp, "category": "gender", "gate_token_ids": [3, 1],
            "training": {"steps": 12, "best_val_mu": 0.01}}


def _fake_hub_cache(root, repo: str, head_dir) -> None:
    """huggingface_hub's cache layout for one model repo at revision REV (plain files, no blob symlinks)."""
    d = root / ("models--" + repo.replace("/", "--"))
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(REV)
    shutil.copytree(head_dir, d / "snapshots" / REV)


def test_save_pretrained_from_pretrained_round_trip_with_a_model_card(tmp_path):
    head = _trained_head()
    card = {"metrics": {"mu": 0.012, "base mu": 0.05}, "training_data": {"tuples": 64}, "caveats": ["toy head"]}
    out = head.save_pretrained(tmp_path / "h", meta=_meta(), card=card)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = LogitHead.from_pretrained(out, expect_tokenizer_fingerprint="sha256:abc", expect_k=K)
    for n, p in head.state_dict().items():
        assert torch.equal(p, loaded.state_dict()[n]), n
    assert loaded.refine_config["category"] == "gender" and not loaded.training
    text = (out / "README.md").read_text()
    meta = huggingface_hub.ModelCard(text).data.to_dict()
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["library_name"] == "refine_llm"
    for needle in ("sha256:abc", "gender", "tuples: 64", "| mu | 0.012 |", "toy head", "Caveats"):
        assert needle in text, needle
    assert isinstance(HubHeadMixin.from_pretrained(out), LogitHead)
    with pytest.raises(UserError, match="not a PaperHead"):
        PaperHead.from_pretrained(out)
    with pytest.raises(UserError, match="another tokenizer"):
        LogitHead.from_pretrained(out, expect_tokenizer_fingerprint="sha256:other")


def test_torn_save_is_detected(tmp_path):
    """config.json records the weights' sha256: new weights under an old config.json never load silently."""
    out = _trained_head().save_pretrained(tmp_path / "h", meta=_meta())
    old_config = (out / "config.json").read_bytes()
    build_head(HeadConfig(variant="logit", k=K)).save_pretrained(tmp_path / "h", meta=_meta())
    (out / "config.json").write_bytes(old_config)  # as if killed between the weights and the config
    with pytest.raises(UserError, match="interrupted save"):
        load_head(out)


def test_repo_id_resolves_offline_from_the_local_hub_cache(tmp_path, monkeypatch, smollm2_fp32):
    from refine_llm.serving import discover_heads, head_configs, load_served_head
    from refine_llm.serving.hf import RefineHeadProcessor

    _, tok = smollm2_fp32
    head = _trained_head()
    saved = head.save_pretrained(tmp_path / "saved", meta=_meta(tokenizer_fingerprint(tok)))
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "refine-org/gender-head", saved)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # where a download would go

    loaded, cfg = load_head("refine-org/gender-head", expect_k=K)
    assert cfg["category"] == "gender" and torch.equal(loaded.out.weight, head.out.weight)
    proc = RefineHeadProcessor("refine-org/gender-head", mode="first", tokenizer=tok)  # tokenizer check stays
    assert torch.equal(proc.served.head.out.weight, head.out.weight) and proc.served.gate_ids.tolist() == [1, 3]
    with pytest.raises(UserError, match="local hub cache"):
        load_head("refine-org/not-downloaded")

    # a serving directory: one head as a subdirectory, one through heads.json (repo id), one relative dir
    heads = tmp_path / "heads"
    shutil.copytree(saved, heads / "local")
    shutil.copytree(saved, tmp_path / "elsewhere" / "h2")
    (heads / "heads.json").write_text(json.dumps({"gender": "refine-org/gender-head", "other": "../elsewhere/h2"}))
    found = discover_heads(heads)
    assert sorted(found) == ["gender", "local", "other"] and found["gender"] == "refine-org/gender-head"
    assert sorted(head_configs(heads)) == ["gender", "local", "other"]
    served = load_served_head(found["gender"], name="gender")
    assert served.name == "gender" and torch.equal(served.head.out.weight, head.out.weight)
    (heads / "heads.json").write_text(json.dumps(["not", "a", "mapping"]))
    with pytest.raises(UserError, match="heads.json must map"):
        discover_heads(heads)
