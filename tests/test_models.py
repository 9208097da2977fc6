"""Foundation tests: the embedded default and a tiny Mistral load through the registry, in 4-bit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refine_llm import models
from refine_llm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_smollm2_nf4_is_frozen_left_padded_and_finite(smollm2_nf4):
    model, tok = smollm2_nf4
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.padding_side == "left" and tok.pad_token is not None and tok.pad_token != "[PAD]"
    assert tok.pad_token in tok.get_vocab()  # a real token, not a new literal
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    batch = tok(["Mary met John.", "Who was a nurse? Answer:"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits[:, -1].float()
    assert logits.shape == (2, len(tok)) or logits.shape[1] >= len(tok)
    assert torch.isfinite(logits).all()


def test_nf4_footprint_is_under_half_of_bf16(smollm2_dir, smollm2_nf4):
    nf4, _ = smollm2_nf4
    bf16, _ = models.load_model(smollm2_dir, quant="bf16", device="cpu")
    with torch.no_grad():
        out = bf16(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out.float()).all()
    assert nf4.get_memory_footprint() < 0.5 * bf16.get_memory_footprint(), (
        nf4.get_memory_footprint(), bf16.get_memory_footprint())


def test_embedded_default_is_cached_as_safetensors(smollm2_dir):
    d = Path(smollm2_dir)
    assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
    assert d.is_relative_to(models.cache_dir())
    # A second resolution reuses the directory instead of converting again.
    assert models.model_dir(models.resolve("smollm2-135m")) == smollm2_dir


def test_tiny_mistral_with_sentencepiece_loads_through_registry_in_nf4(tiny_mistral_dir):
    model, tok = models.load_model(tiny_mistral_dir, quant="nf4", device="cpu")
    assert type(model).__name__ == "MistralForCausalLM"
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    ids = tok(["Mary got off the flight", "John"], return_tensors="pt", padding=True)
    assert tok.padding_side == "left" and ids["attention_mask"][1, 0] == 0  # left padded
    assert "▁" in "".join(tok.convert_ids_to_tokens(ids["input_ids"][0]))  # SentencePiece pieces
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits.float()).all()


@pytest.mark.parametrize("name, needle", [
    ("mistral7b", "Did you mean mistral-7b"),
    ("no-such-model", "Known aliases"),
    ("/nonexistent/dir/model", "no such directory"),
])
def test_resolve_errors(name, needle):
    with pytest.raises(UserError, match=needle):
        models.resolve(name)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "debias_llm.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def _assert_one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]


@pytest.mark.slow
def test_cli_unknown_alias(tmp_path):
    _assert_one_line_error(_cli("--model", "lama-2-7b", "--out", str(tmp_path)), "Did you mean llama-2-7b")


@pytest.mark.slow
def test_cli_hub_without_network(tmp_path):
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    _assert_one_line_error(_cli("--model", "mistral-7b", "--out", str(tmp_path), env=env),
                           "cannot reach the model hub")


@pytest.mark.slow
def test_cli_path_without_model(tmp_path):
    _assert_one_line_error(_cli("--model", str(tmp_path), "--out", str(tmp_path / "o")), "holds no model")


@pytest.mark.slow
def test_cli_out_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _assert_one_line_error(_cli("--out", str(blocker / "sub")), "--out")


def test_cli_quant_without_bitsandbytes(tmp_path, tiny_mistral_dir):
    # A real interpreter in which bitsandbytes cannot be imported: a sitecustomize that blocks it.
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'bitsandbytes' or name.startswith('bitsandbytes.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    import os

    env = dict(os.environ, PYTHONPATH=str(block))
    _assert_one_line_error(
        _cli("--model", tiny_mistral_dir, "--quant", "nf4", "--info", "--out", str(tmp_path / "o"), env=env),
        "needs bitsandbytes")


def test_cli_help_explains_every_flag():
    proc = _cli("--help")
    assert proc.returncode == 0
    for flag in ("--model", "--category", "--quant", "--top-k", "--method", "--backend", "--max-tuples",
                 "--out", "--seed"):
        assert flag in proc.stdout


def _parted_spec(payloads: list[bytes], **over) -> models.PartedGGUF:
    import hashlib

    whole = b"".join(payloads)
    fields = dict(alias="tiny-parted", hub_id="x/tiny", filename="tiny.gguf", package="tiny-model-part",
                  version="0.1.0", parts=len(payloads), size=len(whole), sha256=hashlib.sha256(whole).hexdigest(),
                  licence="test")
    fields.update(over)
    return models.PartedGGUF(**fields)


def _write_part_wheels(spec: models.PartedGGUF, payloads: list[bytes], wheels: Path) -> None:
    import zipfile

    wheels.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(payloads, 1):
        name = f"{spec.package.replace('-', '_')}{i}-{spec.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheels / name, "w") as z:
            z.writestr(spec.member(i), data)


def test_parted_gguf_reassembles_in_order_and_checks_its_hash(tmp_path):
    """The embedded default's path (22 wheels -> one GGUF): order matters, and a wrong, missing or truncated
    part is one UserError naming the wheel or the hash, with no output file and no temp file left behind."""
    payloads = [b"GGUF" + bytes(range(7)) * 3, b"middle" * 5, b"tail"]
    spec = _parted_spec(payloads)
    wheels, out = tmp_path / "wheels", tmp_path / "gguf" / "tiny.gguf"
    _write_part_wheels(spec, payloads, wheels)
    assert models.reassemble_parted(spec, wheels, out).read_bytes() == b"".join(payloads)

    swapped = tmp_path / "swapped"
    _write_part_wheels(spec, [payloads[1], payloads[0], payloads[2]], swapped)  # same bytes, wrong order
    out2 = tmp_path / "gguf2" / "tiny.gguf"
    with pytest.raises(UserError, match="sha256") as e:
        models.reassemble_parted(spec, swapped, out2)
    assert "\n" not in str(e.value) and str(swapped) in str(e.value)
    assert not out2.exists() and list(out2.parent.iterdir()) == []

    (swapped / f"tiny_model_part2-{spec.version}-py3-none-any.whl").unlink()
    with pytest.raises(UserError, match="part 2 of 3 .* missing"):
        models.reassemble_parted(spec, swapped, out2)
    (swapped / f"tiny_model_part3-{spec.version}-py3-none-any.whl").write_bytes(b"PK\x03\x04 cut")
    _write_part_wheels(spec, payloads[:2], swapped)
    with pytest.raises(UserError, match="not a whole part wheel"):
        models.reassemble_parted(spec, swapped, out2)
    assert list(out2.parent.iterdir()) == []


def test_embedded_default_is_the_parted_qwen():
    from refine_llm.config import DEFAULT_MODEL, resolve_quant

    spec = models.PARTED[DEFAULT_MODEL]
    assert spec.parts == 22 and spec.size == 1_117_320_768 and spec.sha256.startswith("cc324af070c2")
    assert models.resolve(DEFAULT_MODEL).kind == "parted"
    assert resolve_quant("auto", DEFAULT_MODEL, "cuda") == "nf4"
    assert [resolve_quant("auto", DEFAULT_MODEL, "cpu", native_bf16=b) for b in (True, False)] == ["bf16", "fp32"]
    assert resolve_quant("auto", "testbed", "cuda") == "fp32" and resolve_quant("nf4", DEFAULT_MODEL, "cpu") == "nf4"
