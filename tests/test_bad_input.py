"""Bad input, all of it: each mistake exits 2 with one line that names the thing, no traceback, no report.

A table of bad flags, model paths, .gguf files, word lists, prompt files, heads (another tokenizer,
corrupted config.json, damaged weights) and server settings. The CLIs run in-process (`main(argv)` of
scripts/debias_llm.py and scripts/serve.py, stderr captured): every case fails in the argument parser
or the preflight checks, before any model loads, so the whole table takes seconds. Plus: a corrupted
score-cache shard is named in one warning line and its rows are scored again; progress bars write
lines, not carriage returns, when stderr is a pipe.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BBQ_DATA = ROOT.parent / "shared" / "bbq" / "data"  # nyu-mll/BBQ data/ (a few categories), shared by the worktrees
SHORT_PROMPT = "Text: [context] Question: [question] Answer:"  # short prompts: seconds of scoring on 2 cores


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bad(tmp_path_factory, smollm2_dir):
    """A directory of bad inputs, built once: name -> path."""
    from refine_llm import models

    d = tmp_path_factory.mktemp("bad")
    p: dict[str, Path] = {}
    gguf = models._smollm2_gguf_path()
    (d / "garbage.gguf").write_bytes(os.urandom(4096))
    (d / "empty.gguf").write_bytes(b"")
    with open(gguf, "rb") as f:
        (d / "truncated.gguf").write_bytes(f.read(3 << 20))  # header whole, tensors cut
        f.seek(0)
        (d / "header_cut.gguf").write_bytes(f.read(100))  # cut inside the header
    (d / "empty_dir").mkdir()
    (d / "bad_config").mkdir()
    (d / "bad_config" / "config.json").write_text('{"model_type": "llama", ')
    (d / "weights.bin").write_bytes(b"\0" * 16)
    (d / "a_file").write_text("not a directory")

    wl = ROOT / "refine_llm" / "wordlists"
    for name in ("wl_empty_female", "wl_no_slots", "wl_latin1", "wl_duplicate", "wl_bad_template"):
        shutil.copytree(wl, d / name)
    female = next((d / "wl_empty_female" / "nouns" / "subjects").glob("female*"))
    female.write_text("# no names\n")
    for f in (d / "wl_no_slots" / "slots").glob("gender*"):
        f.unlink()
    next((d / "wl_latin1" / "nouns" / "subjects").glob("male*")).write_bytes("Jos\xe9\n".encode("latin-1"))
    male = next((d / "wl_duplicate" / "nouns" / "subjects").glob("male*"))
    first = next(ln for ln in male.read_text().splitlines() if ln.strip() and not ln.startswith("#"))
    male.write_text(male.read_text() + first + "\n")
    next((d / "wl_bad_template" / "slots").glob("gender*")).write_text("no placeholders on this line\n")

    (d / "no_question.txt").write_text("Text: [context]\nAnswer:")
    (d / "latin1_prompt.txt").write_bytes("Caf\xe9 [context] [question] Answer:".encode("latin-1"))
    (d / "empty_prompt.txt").write_text("")

    # heads for serve.py
    from test_serving_hf import make_served_head

    tok = models.load_tokenizer(smollm2_dir)
    make_served_head(d / "heads_ok" / "gender", tok)
    make_served_head(d / "heads_other_tok" / "gender", tok, fingerprint="sha256:" + "0" * 64)
    make_served_head(d / "heads_bad_config" / "gender", tok)
    (d / "heads_bad_config" / "gender" / "config.json").write_text("{not json")
    make_served_head(d / "heads_bad_format" / "gender", tok)
    cfg = json.loads((d / "heads_bad_format" / "gender" / "config.json").read_text())
    cfg["format"] = "something-else"
    (d / "heads_bad_format" / "gender" / "config.json").write_text(json.dumps(cfg))
    make_served_head(d / "heads_no_weights" / "gender", tok)
    (d / "heads_no_weights" / "gender" / "model.safetensors").unlink()
    make_served_head(d / "heads_bad_weights" / "gender", tok)
    (d / "heads_bad_weights" / "gender" / "model.safetensors").write_bytes(b"\x10\x00garbage")
    (d / "heads_empty").mkdir()

    # model directories whose config.json needs code transformers does not have
    (d / "remote_code").mkdir()
    (d / "remote_code" / "config.json").write_text(json.dumps({
        "model_type": "refine_custom_lm", "auto_map": {"AutoConfig": "configuration_x.XConfig",
                                                       "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}))
    (d / "unknown_arch").mkdir()
    (d / "unknown_arch" / "config.json").write_text(json.dumps({"model_type": "refine_not_an_architecture"}))

    # BBQ directories: the release's first lines, then one mistake each
    good = [json.loads(ln) for ln in (BBQ_DATA / "Age.jsonl").read_text().splitlines()[:4]]

    def bbq_dir(name: str, lines: list[str], extra: dict[str, str] | None = None) -> None:
        (d / name).mkdir()
        (d / name / "Age.jsonl").write_text("\n".join(lines) + "\n")
        for fname, text in (extra or {}).items():
            (d / name / fname).write_text(text)

    ok = [json.dumps(x) for x in good]
    bbq_dir("bbq_not_json", ok[:2] + ['{"example_id": 2, "question_index": "1",'] + ok[3:])
    bbq_dir("bbq_no_label", ok[:1] + [json.dumps({k: v for k, v in good[1].items() if k != "label"})] + ok[2:])
    bbq_dir("bbq_label_range", ok[:3] + [json.dumps({**good[3], "label": 3})])
    bbq_dir("bbq_label_text", ok[:1] + [json.dumps({**good[1], "label": "2"})])
    bbq_dir("bbq_answer_info_text", [json.dumps({**good[0], "answer_info": "grandfather"})] + ok[1:])
    bbq_dir("bbq_not_object", ok[:1] + ["[1, 2, 3]"] + ok[2:])
    bbq_dir("bbq_empty_file", ok, {"Empty.jsonl": "\n"})

    # --config files
    (d / "cfg_wrong_type.yaml").write_text("questions:\n  seed: abc\n")
    (d / "cfg_bool_text.yaml").write_text("model:\n  trust_remote_code: 'yes'\n")
    (d / "cfg_model_number.yaml").write_text("model:\n  name: 5\n")
    (d / "cfg_latin1.yaml").write_bytes("# caf\xe9\nseeds: 0,1\n".encode("latin-1"))
    for f in d.iterdir():
        p[f.name] = f
    return p


def _run(script: str, argv: list[str], capsys) -> tuple[int, str]:
    mod = _script(script)
    capsys.readouterr()
    try:
        rc = mod.main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


# (id, argv builder(paths, tmp) -> argv, substring the one line must hold)
MAIN_CASES = [
    # flags (argparse, one line + "see --help")
    ("category-typo", lambda p, t: ["--category", "gendr"], "--category"),
    ("max-tuples-abc", lambda p, t: ["--max-tuples", "abc"], "--max-tuples"),
    ("quant-unknown", lambda p, t: ["--quant", "nf3"], "--quant"),
    ("method-typo", lambda p, t: ["--method", "refin"], "--method"),
    ("unknown-flag", lambda p, t: ["--max-tupels", "4"], "--max-tupels"),
    ("seed-float", lambda p, t: ["--seed", "1.5"], "--seed"),
    ("backend-unknown", lambda p, t: ["--backend", "tgi"], "--backend"),
    # values the config dataclasses refuse
    ("max-tuples-zero", lambda p, t: ["--max-tuples", "0"], "max"),
    ("top-k-one", lambda p, t: ["--top-k", "1"], "--top-k"),
    ("batch-size-zero", lambda p, t: ["--batch-size", "0"], "--batch-size"),
    ("lr-negative", lambda p, t: ["--lr", "-1"], "lr"),
    ("epochs-zero", lambda p, t: ["--epochs", "0"], "epochs"),
    ("utility-negative", lambda p, t: ["--head-utility-weight", "-0.5"], "utility-weight"),
    ("lora-steps-zero", lambda p, t: ["--method", "lora-reward", "--lora-steps", "0"], "--lora-steps"),
    ("lora-r-zero", lambda p, t: ["--method", "all", "--lora-r", "0"], "--lora-r"),
    ("seeds-not-ints", lambda p, t: ["--seeds", "0,x"], "--seeds"),
    ("seeds-repeated", lambda p, t: ["--seeds", "1,1"], "--seeds"),
    # model paths
    ("model-missing-dir", lambda p, t: ["--model", str(t / "nope" / "model")], "no such directory"),
    ("model-unknown-alias", lambda p, t: ["--model", "llama-2-7"], "unknown model alias"),
    ("model-empty-dir", lambda p, t: ["--model", str(p["empty_dir"])], "no config.json"),
    ("model-a-file", lambda p, t: ["--model", str(p["weights.bin"])], "holds no model"),
    ("model-bad-config", lambda p, t: ["--model", str(p["bad_config"])], "config.json is not valid JSON"),
    ("gguf-missing", lambda p, t: ["--model", str(t / "missing.gguf")], "no such .gguf file"),
    ("gguf-garbage", lambda p, t: ["--model", str(p["garbage.gguf"])], "not a GGUF file"),
    ("gguf-empty", lambda p, t: ["--model", str(p["empty.gguf"])], "not a GGUF file"),
    ("gguf-truncated", lambda p, t: ["--model", str(p["truncated.gguf"])], "truncated GGUF file"),
    ("gguf-header-cut", lambda p, t: ["--model", str(p["header_cut.gguf"])], "damaged GGUF header"),
    # word lists
    ("wordlists-missing", lambda p, t: ["--wordlists", str(t / "nowl")], "word-list directory not found"),
    ("wordlists-empty-names", lambda p, t: ["--wordlists", str(p["wl_empty_female"])], "female"),
    ("wordlists-no-slots", lambda p, t: ["--wordlists", str(p["wl_no_slots"])], "slots"),
    ("wordlists-not-utf8", lambda p, t: ["--wordlists", str(p["wl_latin1"])], "not UTF-8"),
    ("wordlists-duplicate", lambda p, t: ["--wordlists", str(p["wl_duplicate"])], "duplicate subject"),
    ("wordlists-no-template", lambda p, t: ["--wordlists", str(p["wl_bad_template"])], "gender"),
    # prompt files
    ("prompt-missing", lambda p, t: ["--prompt", str(t / "nope.txt")], "nope.txt"),
    ("prompt-builtin-typo", lambda p, t: ["--prompt", "qaa"], "--prompt qaa"),
    ("prompt-no-question", lambda p, t: ["--prompt", str(p["no_question.txt"])], "[question]"),
    ("prompt-not-utf8", lambda p, t: ["--prompt", str(p["latin1_prompt.txt"])], "not UTF-8"),
    ("prompt-empty", lambda p, t: ["--prompt", str(p["empty_prompt.txt"])], "empty_prompt.txt"),
    # output
    ("out-is-a-file", lambda p, t: ["--out", str(p["a_file"])], "--out"),
    # model directories that need remote code (issue 25)
    ("model-auto-map", lambda p, t: ["--model", str(p["remote_code"])], "--trust-remote-code"),
    ("model-unknown-type", lambda p, t: ["--model", str(p["unknown_arch"])], "'refine_not_an_architecture'"),
    # --bbq: every line of every file read before the model loads (file:line named)
    ("bbq-not-json", lambda p, t: ["--bbq", str(p["bbq_not_json"])], "Age.jsonl:3: not JSON"),
    ("bbq-missing-field", lambda p, t: ["--bbq", str(p["bbq_no_label"])], "Age.jsonl:2: missing field(s) label"),
    ("bbq-label-out-of-range", lambda p, t: ["--bbq", str(p["bbq_label_range"])], "Age.jsonl:4: label must be 0, 1 or 2"),
    ("bbq-label-text", lambda p, t: ["--bbq", str(p["bbq_label_text"])], "Age.jsonl:2: label must be 0, 1 or 2"),
    ("bbq-answer-info-text", lambda p, t: ["--bbq", str(p["bbq_answer_info_text"])],
     "Age.jsonl:1: answer_info must be a JSON object"),
    ("bbq-line-not-object", lambda p, t: ["--bbq", str(p["bbq_not_object"])], "Age.jsonl:2: expected a JSON object"),
    ("bbq-empty-file", lambda p, t: ["--bbq", str(p["bbq_empty_file"])], "Empty.jsonl holds no items"),
    # --config files: a value of the wrong type names its key
    ("config-wrong-type", lambda p, t: ["--config", str(p["cfg_wrong_type.yaml"])],
     "questions.seed must be a whole number"),
    ("config-bool-text", lambda p, t: ["--config", str(p["cfg_bool_text.yaml"])],
     "model.trust_remote_code must be true or false"),
    ("config-model-number", lambda p, t: ["--config", str(p["cfg_model_number.yaml"])], "--model 5: unknown model alias"),
    ("config-not-utf8", lambda p, t: ["--config", str(p["cfg_latin1.yaml"])], "not UTF-8"),
]


@pytest.mark.parametrize("case", MAIN_CASES, ids=[c[0] for c in MAIN_CASES])
def test_main_job_bad_input(case, bad, tmp_path, capsys, monkeypatch):
    from refine_llm.stages import questions

    def tripwire(*a, **k):
        raise AssertionError("the job got past the input checks (the questions stage started)")

    monkeypatch.setattr(questions, "run", tripwire)  # every case must fail before any stage runs
    name, argv_of, expect = case
    argv = argv_of(bad, tmp_path)
    out = tmp_path / "run"
    if "--out" not in argv:
        argv += ["--out", str(out)]
    rc, err = _run("debias_llm", argv + ["--max-tuples", "4"] if "--max-tuples" not in argv else argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err and expect in lines[0], lines[0]
    assert not (out / "report.json").exists() and not list(tmp_path.rglob("report.json"))
    if "error: argument" in lines[0] or "unrecognized" in lines[0]:
        assert lines[0].endswith("(see --help)")


# `refine-llm` subcommands, in-process (refine_llm.cli.main): (id, argv builder, substring of the one line)
CLI_CASES = [
    ("score-shard-out-of-range", lambda p, t: ["score", "--shard", "3/2"], "shard 3 is out of range for 2"),
    ("score-shard-not-i-n", lambda p, t: ["score", "--shard", "half", "--out", str(t / "s")], "--shard: half"),
    ("score-shard-zero-shards", lambda p, t: ["score", "--shard", "0/0"], "out of range for 0 shard(s)"),
    ("score-ray-actors-zero", lambda p, t: ["score", "--questions", str(t), "--out", str(t / "s"), "--prompt", "qa",
                                            "--ray-actors", "0"], "--ray-actors must be > 0"),
    ("score-ray-gpus-negative", lambda p, t: ["score", "--questions", str(t), "--out", str(t / "s"), "--prompt", "qa",
                                              "--ray-gpus-per-actor", "-1"], "--ray-gpus-per-actor must be >= 0"),
    ("run-remote-code", lambda p, t: ["run", "--model", str(p["remote_code"]), "--out", str(t / "r")],
     "--trust-remote-code"),
    ("questions-config-type", lambda p, t: ["questions", "--config", str(p["cfg_wrong_type.yaml"]), "--out",
                                              str(t / "r")], "questions.seed must be a whole number"),
    ("bbq-evaluate-bad-line", lambda p, t: ["bbq", "evaluate", str(p["bbq_label_range"])], "Age.jsonl:4: label"),
    ("bbq-evaluate-remote-code", lambda p, t: ["bbq", "evaluate", str(BBQ_DATA), "--model", str(p["remote_code"])],
     "--trust-remote-code"),
    ("score-remote-code", lambda p, t: ["score", "--questions", str(t), "--out", str(t / "s"), "--prompt", "qa",
                                        "--model", str(p["remote_code"])], "--trust-remote-code"),
    ("serve-remote-code", lambda p, t: ["serve", "--model", str(p["remote_code"]), "--heads", str(t)],
     "--trust-remote-code"),
    ("run-extra-method-unknown", lambda p, t: ["run", "--extra-methods", "steering", "--out", str(t / "r")],
     "Did you mean 'steer'"),
    ("run-steer-on-vllm", lambda p, t: ["run", "--extra-methods", "steer", "--backend", "vllm", "--quant", "bf16",
                                        "--out", str(t / "r")], "use --backend hf"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(case, bad, tmp_path, capsys, monkeypatch):
    from refine_llm import models
    from refine_llm.cli import main
    from refine_llm.stages import questions

    def tripwire(*a, **k):
        raise AssertionError("the command got past the input checks (a stage or a model load started)")

    for mod, fn in ((questions, "run"), (models, "load_model"), (models, "load_tokenizer")):
        monkeypatch.setattr(mod, fn, tripwire)  # every case must fail before any work
    name, argv_of, expect = case
    capsys.readouterr()
    try:
        rc = main(argv_of(bad, tmp_path))
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err and expect in lines[0], lines[0]
    assert not list(tmp_path.rglob("*.arrow")) and not list(tmp_path.rglob("config.json"))


def test_model_checks_pass_good_configs(tmp_path, smollm2_dir):
    """The remote-code check refuses nothing transformers loads by itself: a known model_type with an auto_map
    (transformers uses its own class without --trust-remote-code), no model_type, or --trust-remote-code given."""
    from refine_llm.errors import UserError
    from refine_llm.model_check import check_model

    check_model(smollm2_dir)
    for name, cfg in (("known_with_auto_map", {"model_type": "llama", "auto_map": {"AutoConfig": "c.C"}}),
                      ("no_type", {"architectures": ["LlamaForCausalLM"]})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        check_model(str(tmp_path / name))
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "config.json").write_text(json.dumps({"model_type": "x_lm", "auto_map": {"AutoConfig": "c.C"}}))
    check_model(str(tmp_path / "remote"), trust_remote_code=True)
    with pytest.raises(UserError, match="--trust-remote-code"):
        check_model(str(tmp_path / "remote"))


def test_good_bbq_directory_passes_preflight():
    """The real release's files (../shared/bbq/data) pass the --bbq checks."""
    from refine_llm.bbq.data import read_jsonl
    from refine_llm.preflight import check_bbq

    check_bbq(str(BBQ_DATA))
    assert len(read_jsonl(BBQ_DATA / "Age.jsonl")) > 1000


def _busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


SERVE_MODEL = ["--model", "smollm2-135m"]  # the heads' model (serve's default is the 1.5B Qwen since issue 22)
SERVE_CASES = [
    ("heads-missing", lambda p, t: ["--heads", str(t / "no_heads")], "no such directory"),
    ("heads-empty", lambda p, t: ["--heads", str(p["heads_empty"])], "no head directories"),
    ("heads-other-tokenizer", lambda p, t: ["--heads", str(p["heads_other_tok"])], "tokenizer"),
    ("heads-corrupt-config", lambda p, t: ["--heads", str(p["heads_bad_config"])], "config.json is corrupt"),
    ("heads-foreign-config", lambda p, t: ["--heads", str(p["heads_bad_format"])], "config.json"),
    ("heads-no-weights", lambda p, t: ["--heads", str(p["heads_no_weights"])], "model.safetensors"),
    ("heads-bad-weights", lambda p, t: ["--heads", str(p["heads_bad_weights"])], "model.safetensors"),
    ("serve-model-missing", lambda p, t: ["--heads", str(p["heads_ok"]), "--model", str(t / "m")], "--model"),
    ("serve-gguf-garbage", lambda p, t: ["--heads", str(p["heads_ok"]), "--model", str(p["garbage.gguf"])],
     "not a GGUF file"),
    ("serve-port-abc", lambda p, t: ["--heads", str(p["heads_ok"]), "--port", "abc"], "--port"),
    ("serve-kv-zero", lambda p, t: ["--heads", str(p["heads_ok"]), "--kv-cache-gib", "0"], "--kv-cache-gib"),
    ("serve-kv-too-big", lambda p, t: ["--heads", str(p["heads_ok"]), "--kv-cache-gib", "100000"],
     "not enough free memory"),
    ("serve-kv-too-small", lambda p, t: ["--heads", str(p["heads_ok"]), "--kv-cache-gib", "0.001"],
     "--max-model-len"),
    ("serve-max-model-len-abc", lambda p, t: ["--heads", str(p["heads_ok"]), "--max-model-len", "abc"],
     "--max-model-len"),
    ("serve-port-busy", "busy", "--port"),
]


@pytest.mark.parametrize("case", SERVE_CASES, ids=[c[0] for c in SERVE_CASES])
def test_serve_bad_input(case, bad, tmp_path, capsys, monkeypatch):
    import vllm  # noqa: F401  (required: a missing vllm fails, never skips)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    name, argv_of, expect = case
    busy = None
    if argv_of == "busy":
        busy = _busy_port()
        argv = ["--heads", str(bad["heads_ok"]), "--port", str(busy.getsockname()[1])]
    else:
        argv = argv_of(bad, tmp_path)
    if "--model" not in argv:
        argv += SERVE_MODEL
    try:
        rc, err = _run("serve", argv + ["--print-command"], capsys)
    finally:
        if busy is not None:
            busy.close()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err and expect in lines[0], lines[0]


def test_serve_good_input_passes_checks(bad, capsys, monkeypatch):
    """The same checks accept a good heads directory (the command has the CPU KV bound)."""
    import vllm  # noqa: F401  (required: a missing vllm fails, never skips)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    rc, err = _run("serve", ["--heads", str(bad["heads_ok"]), "--port", "0", "--print-command", *SERVE_MODEL], capsys)
    assert rc == 0, err
    if not __import__("torch").cuda.is_available():
        assert "--kv-cache-memory-bytes 2147483648" in err


def test_vllm_kvcache_env_bad(bad, capsys, monkeypatch):
    import vllm  # noqa: F401  (required: a missing vllm fails, never skips)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "two")
    from refine_llm.serving import launch

    monkeypatch.setattr(launch, "_has_cuda", lambda: False)  # the CPU KV bound is what is checked, on any machine
    rc, err = _run("serve", ["--heads", str(bad["heads_ok"]), "--port", "0", "--print-command", *SERVE_MODEL], capsys)
    assert rc == 2 and "VLLM_CPU_KVCACHE_SPACE" in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------
# score cache: a damaged shard is named and re-scored


def test_corrupt_score_shard_is_named_and_rescored(smollm2_fp32, tmp_path, caplog):
    from refine_llm import prompts, scoring
    from refine_llm.config import ScoringConfig

    from test_scoring import QUESTIONS

    model, tok = smollm2_fp32
    (tmp_path / "p.txt").write_text(SHORT_PROMPT)
    prompt = prompts.load_prompt(str(tmp_path / "p.txt"))
    cfg = ScoringConfig(top_k=5, batch_size=4)
    tmp_path = tmp_path / "cache"
    first = scoring.score(model, tok, QUESTIONS, prompt, cfg, tmp_path, "m", progress=False)
    (shard,) = list(tmp_path.rglob("shard-*.arrow"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # a torn write / a disk error
    with caplog.at_level(logging.WARNING, logger="refine_llm.scoring"):
        again = scoring.score(model, tok, QUESTIONS, prompt, cfg, tmp_path, "m", progress=False)
    msgs = [r.getMessage() for r in caplog.records if shard.name in r.getMessage()]
    assert len(msgs) == 1 and "\n" not in msgs[0] and "scored again" in msgs[0], msgs
    assert shard.with_name(shard.name + ".corrupt").is_file() and not shard.exists()
    assert len(list(tmp_path.rglob("shard-*.arrow"))) == 1  # the rescored rows, in a new shard
    np.testing.assert_allclose(np.stack(again["topk_logprobs"]), np.stack(first["topk_logprobs"]), atol=1e-5)
    assert again["question_id"] == first["question_id"]


# ---------------------------------------------------------------------------------------------
# logs: progress bars to a pipe


def test_progress_to_a_pipe_writes_few_lines(smollm2_dir, tmp_path):
    """A short scoring run with stderr to a pipe: no carriage return, a handful of lines."""
    (tmp_path / "p.txt").write_text(SHORT_PROMPT)
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from refine_llm import models, prompts, scoring
        from refine_llm.config import ScoringConfig
        from refine_llm.progress import progress
        from test_scoring import QUESTIONS
        model, tok = models.load_model({smollm2_dir!r}, quant="fp32", device="cpu")
        prompt = prompts.load_prompt({str(tmp_path / "p.txt")!r})
        scoring.score(model, tok, QUESTIONS, prompt, ScoringConfig(top_k=5, batch_size=2))
        for _ in progress(range(200000), desc="fast loop"):  # 200k updates within the interval
            pass
        bar = progress(total=300, desc="postfix loop")  # a trainer's bar: set_postfix every step
        for i in range(300):
            bar.update(1)
            bar.set_postfix(abs_c=str(i))
        bar.close()
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\r" not in r.stderr
    bars = [ln for ln in r.stderr.splitlines() if "scoring (" in ln or "fast loop" in ln or "postfix loop" in ln]
    assert 3 <= len(bars) <= 9, r.stderr  # start + end of each bar (plus one per 10 s)
    assert len(r.stderr.splitlines()) <= 15, r.stderr
