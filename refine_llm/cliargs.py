"""Command-line flags generated from the config dataclasses, so that every default has one home.

`add_config_args(parser)` walks `RunConfig` (refine_llm.config): each field becomes one flag, and each
nested config contributes its fields under the prefix in the nested field's metadata (``"prefix"``):
model, questions and scoring keep plain names (--model, --category, --top-k), the head's training
fields are --head-* (--head-lr, --head-objective) and the LoRA fields --lora-* (--lora-lr). A field's
own metadata may name its flag (``"flag": "--head"``) or keep it off the command line (``"cli": False``,
for values derived from others, such as the head's k = --top-k). The generator refuses two fields
that would get the same flag, which is how colliding names (seed, lr, batch_size, objective, ...) were
given their prefixes.

Types come from the annotations: int/float/str, ``X | None`` (the word ``none`` gives None), bool
(``--x`` / ``--no-x``) and Literal (the choices; an objective's pre-rename name gets the new one).
Flags default to "not given" (argparse.SUPPRESS), so `config_from_args` can lay the given flags over
the defaults, or over a ``--config`` file: RunConfig() <- file <- flags.

Why not transformers' HfArgumentParser: it names flags after fields, so the same field name in two
configs (seed, lr, batch_size, ...) collides, and it has no notion of a file under the flags that keeps
the flags' priority while refusing an old schema.
"""

from __future__ import annotations

import argparse
import difflib
import re
import types
from dataclasses import fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from refine_llm.config import RENAMED_OBJECTIVES, RunConfig, load_config_file

__all__ = ["add_config_args", "config_from_args", "check_renamed_flags", "RENAMED_FLAGS"]

# Flags that existed before the generated CLI, refused with their new name (one line, exit 2).
RENAMED_FLAGS = {"--objective": "--head-objective", "--lr": "--head-lr", "--epochs": "--head-epochs",
                 "--utility-weight": "--head-utility-weight"}


def _flag(f, prefix: str) -> str:
    return f.metadata.get("flag") or "--" + (prefix + f.name).replace("_", "-")


def _literal_type(flag: str, choices: tuple):
    def parse(s: str):
        if s in RENAMED_OBJECTIVES and RENAMED_OBJECTIVES[s] in choices:
            raise argparse.ArgumentTypeError(f"{s!r} was renamed: use {flag} {RENAMED_OBJECTIVES[s]} "
                                             f"(choices: {', '.join(choices)})")
        if s not in choices:
            near = difflib.get_close_matches(s, choices, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise argparse.ArgumentTypeError(f"invalid choice {s!r}: {hint}choose from {', '.join(choices)}")
        return s
    return parse


def _scalar_type(t: type, optional: bool):
    def parse(s: str):
        if optional and s.lower() == "none":
            return None
        try:
            return t(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {t.__name__} value: {s!r}") from None
    parse.__name__ = t.__name__  # argparse names the type in its messages
    return parse


def _add_field(group, f, t, prefix: str, dest: str, default: Any, seen: dict[str, str]) -> None:
    flag = _flag(f, prefix)
    if flag in seen:
        raise AssertionError(f"{dest} and {seen[flag]} both want the flag {flag}: give one a prefix or a 'flag'")
    seen[flag] = dest
    help_ = f.metadata.get("help", "").replace("%", "%%")
    optional = get_origin(t) in (Union, types.UnionType) and type(None) in get_args(t)
    if optional:
        t = next(a for a in get_args(t) if a is not type(None))
    shown = "" if default is None else f" (default: {default})"  # a None default is explained in the help
    kw: dict[str, Any] = dict(dest=dest, default=argparse.SUPPRESS, help=help_ + shown)
    if t is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
    elif get_origin(t) is Literal:
        choices = get_args(t)
        group.add_argument(flag, type=_literal_type(flag, choices), metavar="{" + ",".join(choices) + "}", **kw)
    else:
        group.add_argument(flag, type=_scalar_type(t, optional), metavar=flag.lstrip("-").upper().replace("-", "_"),
                           **kw)


def add_config_args(parser: argparse.ArgumentParser, cls: type = RunConfig) -> None:
    """One flag per field of ``cls`` (a RunConfig-like dataclass with nested configs); dests are
    dotted paths ("bandit.lr"). Help shows the defaults of ``cls()``."""
    defaults = cls()
    seen: dict[str, str] = {}
    hints = get_type_hints(cls)
    top = parser.add_argument_group("run")
    for f in fields(cls):
        t = hints[f.name]
        if is_dataclass(t):
            sub = getattr(defaults, f.name)
            group = parser.add_argument_group(f.name, (t.__doc__ or "").strip().split("\n")[0])
            sub_hints = get_type_hints(t)
            for g in fields(t):
                if g.metadata.get("cli", True):
                    _add_field(group, g, sub_hints[g.name], f.metadata.get("prefix", ""), f"{f.name}.{g.name}",
                               getattr(sub, g.name), seen)
        elif f.metadata.get("cli", True):
            _add_field(top, f, t, "", f.name, getattr(defaults, f.name), seen)


def check_renamed_flags(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A flag from before the generated CLI gets one line with its new name (parser.error: exit 2)."""
    for i, a in enumerate(argv):
        name, _, value = a.partition("=")
        if name in RENAMED_FLAGS:
            value = value or (argv[i + 1] if i + 1 < len(argv) else "")
            new_value = f" {RENAMED_OBJECTIVES[value]}" if value in RENAMED_OBJECTIVES else ""
            old_value = f" {value}" if new_value else ""
            parser.error(f"{name}{old_value} is now {RENAMED_FLAGS[name]}{new_value}")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_args(ns: argparse.Namespace, config_file: str | None = None,
                     base: dict | None = None) -> RunConfig:
    """RunConfig() <- ``base`` (e.g. a run directory's config.json) <- ``config_file`` <- the flags given in
    ``ns``. Raises ValueError (one line naming the file or field) on a bad file or value."""
    d = RunConfig().to_dict()
    d["model"]["quant"] = "auto"  # resolved with the final model name (ModelConfig), not the default's
    for layer, source in ((base, "config.json"), (load_config_file(config_file) if config_file else None,
                                                  str(config_file))):
        if layer is None:
            continue
        layer = dict(layer)
        version = layer.pop("schema_version", d["schema_version"])
        if version != d["schema_version"]:
            RunConfig.from_dict({"schema_version": version}, source)  # raises the one-line refusal
        d = _merge(d, layer)
    flags: dict[str, Any] = {}
    for dest, value in vars(ns).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            flags.setdefault(section, {})[name] = value
        elif dest in d and dest != "schema_version":
            flags[dest] = value
    d = _merge(d, flags)
    try:
        return RunConfig.from_dict(d, str(config_file) if config_file else "flags")
    except ValueError as e:
        raise ValueError(_name_flags(str(e))) from None


def _name_flags(msg: str) -> str:
    """"flags: bandit.minibatch_size=16 is larger than batch_size=8" -> the same with the flags' names."""
    m = re.match(r"flags: (\w+)\.", msg)
    if not m or m[1] not in {f.name for f in fields(RunConfig)}:
        return msg
    section = next(f for f in fields(RunConfig) if f.name == m[1])
    names = {g.name: _flag(g, section.metadata.get("prefix", "")) for g in fields(get_type_hints(RunConfig)[m[1]])}
    body = re.sub(r"^(\w+)\b|\b(\w+)=", lambda x: (f"{names[x[1]]}" if x[1] in names else x[0]) if x[1]
                  else (f"{names[x[2]]}=" if x[2] in names else x[0]), msg[m.end():])
    return f"flags: {body}"
