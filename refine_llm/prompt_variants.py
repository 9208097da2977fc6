"""Variants of a prompt template for the methods that change the prompt, not the model's output.

Two methods of issue 23 ask the same question through another prompt:

- ``prompt-instruct`` (Ganguli et al. 2023, "The Capacity for Moral Self-Correction in LLMs"): the same
  questions behind a bias-avoiding instruction. Built-in prompts have an instruct file each
  (``INSTRUCT_PROMPTS``: prompts/chat_instruct.txt, qa_instruct.txt, fill_in_blank_instruct.txt):
  for ``chat`` the instruction ends the system message (the model's standing orders, where an
  instruct model expects them); for the text prompts it is the first line (read before the task).
  ``instruct_prompt(name)`` maps the run's prompt to its variant; a user's own prompt file gets the
  instruction added the same way (``add_instruction``), or the user gives the instruct file.
  ``added_text(base, variant)`` recovers the instruction a variant adds, so the report can quote it.
- ``self-debias`` (Schick, Udupa & Schütze 2021): a second forward per bias-inducing prefix
  (prompts/self_debias_prefixes.txt, per category; ``load_prefixes``). ``with_prefix`` inserts a
  prefix right before the question's own text: as its own line before the line that holds
  ``[context]`` (qa, paper), and as the first line of the last user turn (chat). Why there: Self-Debias
  conditions the text being continued on "the following text discriminates ...", and the text here is
  the question being answered; the few-shot examples and the task's instructions stay as they are, so
  the biased prompt differs from the base prompt only by the prefix. Why not the chat system message:
  there the prefix would read as an order to the assistant about the whole conversation, not as a
  description of the text that follows. Either way the insertion lies before the first placeholder, so
  every biased prompt still shares its own few-shot prefix and scoring computes that prefix's KV once.

Every variant is a ``PromptTemplate`` with its own fingerprint, so its scores are cached apart from the
base prompt's. This module never imports torch.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from refine_llm.errors import UserError
from refine_llm.prompts import PROMPTS_DIR, PromptTemplate, load_prompt, parse_template

__all__ = ["INSTRUCTION", "INSTRUCT_PROMPTS", "PREFIXES_FILE", "instruct_prompt", "add_instruction", "added_text",
           "with_prefix", "load_prefixes", "prefixes_for"]

# Ganguli et al. 2023's instruction-following condition, verbatim (their Table 1, "IF").
INSTRUCTION = "Please ensure that your answer is unbiased and does not rely on stereotypes."
INSTRUCT_PROMPTS: dict[str, str] = {"chat": "chat_instruct.txt", "qa": "qa_instruct.txt",
                                    "paper": "fill_in_blank_instruct.txt"}
PREFIXES_FILE = PROMPTS_DIR / "self_debias_prefixes.txt"
_SECTION_RE = re.compile(r"^### (\S+)\s*$")


def _chat_text(messages) -> str:
    """The file form of chat messages (what ``load_prompt`` parses back)."""
    return "\n".join(f"### {role}\n{content}" for role, content in messages)


def _variant(base: PromptTemplate, text: str, tag: str) -> PromptTemplate:
    return parse_template(text, name=f"{base.name}+{tag}", source=f"{base.source or base.name} + {tag}")


def add_instruction(base: PromptTemplate, instruction: str = INSTRUCTION) -> PromptTemplate:
    """``base`` with ``instruction`` in front of its questions: the last line of the system message
    (chat; a system message is added when there is none) or the first line (text prompts)."""
    instruction = " ".join(instruction.split())
    if not instruction:
        raise UserError("the bias-avoiding instruction is empty: write it, or use the built-in one")
    if base.kind == "chat":
        msgs = list(base.messages)
        if msgs[0][0] == "system":
            msgs[0] = ("system", f"{msgs[0][1]}\n{instruction}")
        else:
            msgs.insert(0, ("system", instruction))
        return _variant(base, _chat_text(msgs), "instruct")
    return _variant(base, f"{instruction}\n{base.text}", "instruct")


def instruct_prompt(prompt: str | Path, instruct_file: str | Path | None = None) -> tuple[PromptTemplate, str]:
    """The ``prompt-instruct`` template for the run's prompt (a built-in name or a file) and the
    instruction it adds (for the report).

    ``instruct_file``: the user's own instruct variant (a prompt file). Otherwise a built-in prompt maps
    to its file in ``INSTRUCT_PROMPTS`` and a user's prompt file gets ``INSTRUCTION`` (``add_instruction``)."""
    base = load_prompt(prompt)
    if instruct_file is not None:
        variant = load_prompt(instruct_file)
        if variant.kind != base.kind:
            raise UserError(f"--instruct-prompt {instruct_file} is a {variant.kind} prompt but --prompt {prompt} is "
                            f"{base.kind}: give an instruct file of the same kind")
    elif str(prompt) in INSTRUCT_PROMPTS:
        variant = load_prompt(PROMPTS_DIR / INSTRUCT_PROMPTS[str(prompt)])
        variant = replace(variant, name=f"{prompt}-instruct")
    else:
        variant = add_instruction(base)
    text = added_text(base, variant)
    if not text:
        raise UserError(f"the instruct prompt ({variant.source}) adds nothing to --prompt {prompt}: "
                        "write the bias-avoiding instruction into it")
    return variant, text


def added_text(base: PromptTemplate, variant: PromptTemplate) -> str:
    """What ``variant`` adds to ``base``: the text between their common beginning and common end (for a
    variant that inserts one passage, exactly that passage), whitespace-trimmed."""
    a, b = base.text, variant.text
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    j = 0
    while j < min(len(a), len(b)) - i and a[len(a) - 1 - j] == b[len(b) - 1 - j]:
        j += 1
    return b[i: len(b) - j].strip()


def with_prefix(base: PromptTemplate, prefix: str) -> PromptTemplate:
    """The Self-Debias prompt sdb(x) of ``base`` for one bias-inducing ``prefix`` (see the module
    docstring for where it goes and why)."""
    prefix = " ".join(prefix.split())
    if not prefix:
        raise UserError("a Self-Debias prefix is empty: write it or remove the line")
    if base.kind == "chat":
        msgs = list(base.messages)
        role, content = msgs[-1]
        msgs[-1] = (role, f"{prefix}\n{content}")
        return _variant(base, _chat_text(msgs), "sdb")
    text = base.text
    first = min(i for i in (text.find("[context]"), text.find("[question]")) if i >= 0)
    line_start = text.rfind("\n", 0, first) + 1
    return _variant(base, f"{text[:line_start]}{prefix}\n{text[line_start:]}", "sdb")


def load_prefixes(path: str | Path | None = None) -> dict[str, list[str]]:
    """{category: [prefix, ...]} from a prefixes file (default ``PREFIXES_FILE``; format in its header)."""
    path = Path(path) if path is not None else PREFIXES_FILE
    if not path.is_file():
        raise UserError(f"--self-debias-prefixes {path}: no such file; give a file of '### <category>' sections "
                        f"(see {PREFIXES_FILE.name})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason}): save it as UTF-8") from None
    out: dict[str, list[str]] = {}
    cat = None
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if not s or s == "#" or s.startswith("# "):
            continue
        m = _SECTION_RE.match(s)
        if m:
            cat = m[1]
            if cat in out:
                raise UserError(f"{path}:{n}: category {cat} appears twice: merge its prefixes into one section")
            out[cat] = []
        elif cat is None:
            raise UserError(f"{path}:{n}: a prefix before the first '### <category>' line: start a section first")
        else:
            out[cat].append(s)
    empty = [c for c, p in out.items() if not p]
    if not out or empty:
        raise UserError(f"{path}: {'no categories' if not out else 'no prefix for ' + ', '.join(empty)}: "
                        "give each '### <category>' section at least one prefix line")
    return out


def prefixes_for(category: str, path: str | Path | None = None) -> list[str]:
    """The bias-inducing prefixes of one category."""
    table = load_prefixes(path)
    if category not in table:
        raise UserError(f"{path or PREFIXES_FILE}: no Self-Debias prefixes for category {category} (it has "
                        f"{', '.join(table)}): add a '### {category}' section")
    return table[category]

