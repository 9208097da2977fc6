"""The generated CLI and the config files: one flag per config field, one home per default, one-line
errors, `--config` from YAML or a run's config.json, old schemas and old names refused. No model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from refine_llm import cli, pipeline
from refine_llm.cli import COMMANDS, parse_run_config
from refine_llm.config import SCHEMA_VERSION, BanditConfig, LoraConfig, RunConfig
from refine_llm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_the_script_is_a_thin_caller():
    text = (ROOT / "scripts" / "debias_llm.py").read_text()
    assert text.count("add_argument") <= 3
    assert "DEFAULT_TRAIN" not in (ROOT / "refine_llm" / "pipeline.py").read_text()


def test_no_flags_give_the_dataclass_defaults():
    cfg, _ = parse_run_config([])
    assert cfg == RunConfig()
    assert cfg.bandit == BanditConfig() and cfg.bandit.objective == "direct"
    assert BanditConfig.paper().objective == "paper" and BanditConfig.paper().lr == 2e-5


def test_every_field_has_a_unique_flag():
    parser = cli.build_run_parser()
    dests = {a.dest for a in parser._actions}
    cfg = RunConfig()
    for f in fields(cfg):
        sub = getattr(cfg, f.name)
        if is_dataclass(sub):
            for g in fields(sub):
                if g.metadata.get("cli", True):
                    assert f"{f.name}.{g.name}" in dests, (f.name, g.name)
        else:
            assert f.name in dests, f.name
    cfg, _ = parse_run_config(["--seed", "3", "--head-seed", "4", "--lora-seed", "5", "--batch-size", "7",
                               "--head-batch-size", "16", "--head-minibatch-size", "8", "--lora-batch-size", "2",
                               "--head-lr", "0.5", "--lora-lr", "0.25", "--top-k", "6", "--head", "paper",
                               "--no-prefix-cache", "--max-tuples", "none", "--lora-objective", "direct"])
    assert (cfg.questions.seed, cfg.bandit.seed, cfg.lora.seed) == (3, 4, 5)
    assert (cfg.scoring.batch_size, cfg.bandit.batch_size, cfg.lora.batch_size) == (7, 16, 2)
    assert (cfg.bandit.lr, cfg.lora.lr) == (0.5, 0.25)
    assert cfg.head.k == cfg.lora.top_k == cfg.scoring.top_k == 6  # derived, not a second flag
    assert cfg.head.variant == "paper" and cfg.scoring.prefix_cache is False and cfg.questions.max_tuples is None
    assert cfg.lora.objective == "direct"


@pytest.mark.parametrize("argv, needle", [
    (["--objective", "expected"], "--objective expected is now --head-objective direct"),
    (["--head-objective", "expected"], "'expected' was renamed: use --head-objective direct"),
    (["--lora-objective", "bandit"], "'bandit' was renamed: use --lora-objective reinforce"),
    (["--lr", "0.1"], "--lr is now --head-lr"),
    (["--max-tuples", "abc"], "--max-tuples: invalid int value: 'abc'"),
    (["--category", "gendr"], "did you mean gender?"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_argparse_mistakes_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        parse_run_config(argv, prog="debias_llm.py")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and needle in err and err.rstrip().endswith("(see --help)"), err
    assert "usage:" not in err


def test_bad_values_across_fields_are_one_line_user_errors():
    with pytest.raises(UserError, match="--head-minibatch-size=16 is larger than --head-batch-size=8"):
        parse_run_config(["--head-batch-size", "8", "--head-minibatch-size", "16"])
    with pytest.raises(ValueError, match="renamed: use 'direct'"):
        BanditConfig(objective="expected")
    with pytest.raises(ValueError, match="renamed: use 'reinforce'"):
        LoraConfig(objective="bandit")


def test_yaml_config_under_the_flags(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("method: none\nquestions:\n  category: religion\nbandit:\n  lr: 0.5\n  epochs: 7\n")
    cfg, _ = parse_run_config(["--config", str(f), "--head-lr", "0.25"])
    assert cfg.method == "none" and cfg.questions.category == "religion"
    assert cfg.bandit.lr == 0.25 and cfg.bandit.epochs == 7  # the flag wins over the file, the file over defaults
    assert cfg.questions.max_tuples == RunConfig().questions.max_tuples  # untouched fields keep the defaults
    f.write_text("bandit:\n  learning_rate: 0.5\n")
    with pytest.raises(UserError, match=r"run.yaml: unknown key bandit.learning_rate"):
        parse_run_config(["--config", str(f)])
    f.write_text("bandit: [1, 2\n")
    with pytest.raises(UserError, match=r"run.yaml:\d+: not valid YAML"):
        parse_run_config(["--config", str(f)])


@pytest.mark.slow
def test_old_schema_is_refused_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    old = {"model": {"name": "smollm2-135m"}, "method": "refine", "head": "logit"}  # config.json before versions
    (run / "config.json").write_text(json.dumps(old))
    with pytest.raises(UserError, match="schema version 1"):
        parse_run_config(["--config", str(run / "config.json")])
    with pytest.raises(UserError, match=f"schema version 1, this refine_llm writes version {SCHEMA_VERSION}"):
        from refine_llm.stages.common import check_schema

        check_schema(run)
    # from the command line: one line, exit 2, before any model loads, and nothing written
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "debias_llm.py"), "--out", str(run)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "schema version 1" in proc.stderr, proc.stderr
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
    (run / "config.json").write_text(json.dumps({**RunConfig().to_dict(), "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(UserError, match=f"schema version {SCHEMA_VERSION + 1}"):
        parse_run_config(["--config", str(run / "config.json")])


def test_config_json_round_trips():
    cfg, _ = parse_run_config(["--category", "nationality", "--head-epochs", "3", "--lora-r", "4"])
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_refine_llm_dispatches_lazily(capsys):
    for name, spec in COMMANDS.items():  # every entry resolves to a callable taking argv
        assert callable(cli._entry(name)), name
    assert cli.main([]) == 2 and "commands:" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {n} " in out for n in COMMANDS), out
    assert cli.main(["evalute"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean evaluate?" in err, err


def test_a_stage_needs_the_previous_one(tmp_path, capsys):
    assert cli.main(["score", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run `refine-llm questions --out" in err, err
    # stages after `questions` read the run's config.json as their defaults
    assert cli.main(["questions", "--category", "religion", "--max-tuples", "1", "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "questions").is_dir() and not (tmp_path / "r" / "scores").exists()
    cfg, _ = parse_run_config(["--out", str(tmp_path / "r")], from_run_dir=True)
    assert cfg.questions.category == "religion" and cfg.questions.max_tuples == 1
