"""Command-line flags generated from the config dataclasses, so that every default has one home.

The project's one parser generator: the main job and its stages (`RunConfig`), and every other command
(`refine-llm questions|score|merge|bbq|serve|fetch`, `python -m refine_llm.scoring`, scripts/make_testbed.py)
from its own dataclass in refine_llm.config (``parse_config(QuestionsArgs, argv)``). No command writes
a parser by hand, so no default lives outside config.py.

`add_config_args(parser)` walks `RunConfig` (refine_llm.config): each field becomes one flag, and each
nested config contributes its fields under the prefix in the nested field's metadata (``"prefix"``):
model, questions and scoring keep plain names (--model, --category, --top-k), the head's training
fields are --head-* (--head-lr, --head-objective) and the LoRA fields --lora-* (--lora-lr). A field's
own metadata may name its flag (``"flag": "--head"``) or keep it off the command line (``"cli": False``,
for values derived from others, such as the head's k = --top-k). The generator refuses two fields
that would get the same flag, which is how colliding names (seed, lr, batch_size, objective, ...) were
given their prefixes.

Types come from the annotations: int/float/str, ``X | None`` (the word ``none`` gives None), bool
(``--x`` / ``--no-x``), Literal (the choices; an objective's pre-rename name gets the new one) and
``list[str]`` (a repeatable flag, or one or more positional values). A field without a default is a
required flag; ``"positional": True`` makes it an argument.
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
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from refine_llm.config import RENAMED_OBJECTIVES, RunConfig, load_config_file

__all__ = ["add_config_args", "build_config", "parser_for", "parse_config", "config_from_args", "check_renamed_flags",
           "RENAMED_FLAGS"]

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


def _checked_type(check, t: type, flag: str):
    """The flag's value as ``t``, after ``check(value)`` (which raises ValueError with the one-line message;
    argparse names the flag itself, so a message that starts with it loses that prefix)."""
    def parse(s: str):
        try:
            check(s)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{flag} ")) from None
        return t(s)
    parse.__name__ = t.__name__
    return parse


def _unwrap(t) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    if get_origin(t) in (Union, types.UnionType) and type(None) in get_args(t):
        return next(a for a in get_args(t) if a is not type(None)), True
    return t, False


def _add_field(group, f, t, prefix: str, dest: str, default: Any, seen: dict[str, str], over: dict) -> None:
    meta = {**f.metadata, **over}
    positional = meta.get("positional", False)
    flag = dest.split(".")[-1] if positional else (meta.get("flag") or "--" + (prefix + f.name).replace("_", "-"))
    if flag in seen:
        raise AssertionError(f"{dest} and {seen[flag]} both want the flag {flag}: give one a prefix or a 'flag'")
    seen[flag] = dest
    help_ = meta.get("help", "").replace("%", "%%")
    t, optional = _unwrap(t)
    required = meta.get("required", default is MISSING)
    shown = "" if default is None or default is MISSING or default == [] else f" (default: {default})"
    kw: dict[str, Any] = dict(help=help_ + shown)
    if positional:  # dest is the argument's name; a list takes one or more values
        kw.update(metavar=meta.get("metavar", f.name.upper()), nargs="+" if get_origin(t) is list else None)
        group.add_argument(dest, type=str, **kw)
        return
    kw.update(dest=dest, default=argparse.SUPPRESS)
    if required:
        kw["required"] = True
    if t is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
    elif get_origin(t) is Literal:
        choices = get_args(t)
        group.add_argument(flag, type=_literal_type(flag, choices), metavar="{" + ",".join(choices) + "}", **kw)
    elif get_origin(t) is list:  # a repeatable flag: --head A --head B
        group.add_argument(flag, action="append", type=_scalar_type(get_args(t)[0], False),
                           metavar=meta.get("metavar", flag.lstrip("-").upper().replace("-", "_")), **kw)
    elif "check" in meta:  # a value checked as it is parsed: its error comes before "the following arguments are required"
        group.add_argument(flag, type=_checked_type(meta["check"], t, flag),
                           metavar=meta.get("metavar", flag.lstrip("-").upper().replace("-", "_")), **kw)
    else:
        group.add_argument(flag, type=_scalar_type(t, optional),
                           metavar=meta.get("metavar", flag.lstrip("-").upper().replace("-", "_")), **kw)


def _default(f) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def add_config_args(parser: argparse.ArgumentParser, cls: type = RunConfig,
                    overrides: dict[str, dict] | None = None) -> None:
    """One flag per field of dataclass ``cls``; a nested config contributes its fields under the prefix in the
    nested field's metadata (``"prefix"``; ``"fields"`` keeps only some of them). Dests are dotted paths
    ("bandit.lr"). Help shows the defaults of ``cls`` (a field without a default is a required flag, or a
    positional argument with ``"positional": True``). ``overrides``: per dest, metadata that replaces the
    field's own (e.g. ``{"data": {"flag": "--bbq", "positional": False}}``: one config, two spellings)."""
    overrides = overrides or {}
    seen: dict[str, str] = {}
    hints = get_type_hints(cls)
    top = parser.add_argument_group("run" if cls is RunConfig else "options")
    for f in fields(cls):
        t = hints[f.name]
        if is_dataclass(t):
            sub = _default(f)
            group = parser.add_argument_group(f.name, (t.__doc__ or "").strip().split("\n")[0])
            sub_hints = get_type_hints(t)
            only = f.metadata.get("fields")
            for g in fields(t):
                if g.metadata.get("cli", True) and (only is None or g.name in only):
                    dest = f"{f.name}.{g.name}"
                    _add_field(group, g, sub_hints[g.name], f.metadata.get("prefix", ""), dest,
                               getattr(sub, g.name), seen, overrides.get(dest, {}))
        elif f.metadata.get("cli", True):
            _add_field(top, f, t, "", f.name, _default(f), seen, overrides.get(f.name, {}))


def build_config(cls: type, ns: argparse.Namespace, source: str = "flags") -> Any:
    """An instance of ``cls`` from the flags given in ``ns`` over its defaults (nested configs too).
    Raises ValueError (one line, with the flags' names) on a bad value."""
    given = vars(ns)
    hints = get_type_hints(cls)
    kw: dict[str, Any] = {}
    for f in fields(cls):
        t = hints[f.name]
        if is_dataclass(t):
            sub = {k.split(".", 1)[1]: v for k, v in given.items() if k.startswith(f.name + ".")}
            if sub:
                kw[f.name] = _build_section(t, _default(f), sub, f, source)
        elif f.name in given:
            kw[f.name] = given[f.name]
    try:
        return cls(**kw)
    except ValueError as e:
        raise ValueError(f"{source}: {_flag_names(cls, str(e))}") from None


def _build_section(t: type, default: Any, sub: dict, f, source: str) -> Any:
    # Declared defaults when the section is the plain dataclass (so that a value its __post_init__ derives,
    # such as ModelConfig's "auto" quantization, is derived again from the given flags); the factory's
    # values otherwise (RunConfig's questions: max_tuples=64).
    if f.default_factory is t:
        base = {g.name: _default(g) for g in fields(t) if g.init and _default(g) is not MISSING}
    else:
        base = {g.name: getattr(default, g.name) for g in fields(t) if g.init}
    try:
        return t(**{**base, **sub})
    except ValueError as e:
        names = {g.name: _flag(g, f.metadata.get("prefix", "")) for g in fields(t)}
        raise ValueError(f"{source}: {_rename(str(e), names)}") from None


def _flag_names(cls: type, msg: str) -> str:
    return _rename(msg, {f.name: _flag(f, "") for f in fields(cls)})


def _rename(msg: str, names: dict[str, str]) -> str:
    """"minibatch_size=16 is larger than batch_size=8" -> the same with the flags' names."""
    return re.sub(r"^(\w+)\b|\b(\w+)=", lambda x: (f"{names[x[1]]}" if x[1] in names else x[0]) if x[1]
                  else (f"{names[x[2]]}=" if x[2] in names else x[0]), msg)


def parser_for(cls: type, prog: str | None = None, description: str | None = None,
               overrides: dict[str, dict] | None = None) -> argparse.ArgumentParser:
    """The generated parser of a command's config dataclass (one-line errors, refine_llm.errors)."""
    from refine_llm.errors import ArgumentParser

    p = ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip().split("\n\n")[0],
                       allow_abbrev=False)
    add_config_args(p, cls, overrides)
    return p


def parse_config(cls: type, argv: list[str] | None, prog: str | None = None, description: str | None = None,
                 *, overrides: dict[str, dict] | None = None, known: bool = False):
    """argv -> an instance of ``cls`` (a command's config dataclass); with ``known``, also the unparsed rest
    (flags passed on, e.g. to vLLM). Flag mistakes exit 2 in one line; a bad value is a one-line UserError."""
    from refine_llm.errors import UserError

    p = parser_for(cls, prog, description, overrides)
    if known:
        ns, rest = p.parse_known_args(argv)
    else:
        ns, rest = p.parse_args(argv), []
    try:
        cfg = build_config(cls, ns)
    except ValueError as e:
        raise UserError(str(e).removeprefix("flags: ")) from None
    return (cfg, rest) if known else cfg


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
