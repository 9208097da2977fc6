"""Prompt templates: load one from prompts/ (or the user's file) and render a question into a prompt.

A template is a text with two placeholders, ``[context]`` and ``[question]``; the model's next token
after the rendered prompt is read as the answer (refine_llm.scoring). Built-ins (``BUILTIN_PROMPTS``):

- ``paper`` (prompts/fill_in_blank.txt): the REFINE-LM few-shot infilling prompt: a TASK line, four
  solved examples, then ``QUESTION : [context] [question]`` and ``blank =``.
- ``qa`` (prompts/qa.txt): few-shot ``Text: ... Question: Who ...? Answer: <word>`` for models that do
  not follow the infilling format.
- ``chat`` (prompts/chat.txt): turns for the tokenizer's chat template (instruct models), rendered with
  the assistant turn opened, so that the next token is the answer.

A chat file is a sequence of ``### system`` / ``### user`` / ``### assistant`` sections (one message
each) and must end with a ``### user`` section; any other file is plain text. The solved examples use
names and attributes that are not in refine_llm/wordlists, so they leak nothing into the test split,
and the answer is the first subject in half of them and the second in the other half.

``prefix()`` is the part every prompt shares (everything before the first placeholder): scoring
computes its KV cache once. This module never imports torch.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from refine_llm.errors import UserError

__all__ = ["PromptTemplate", "BUILTIN_PROMPTS", "PROMPTS_DIR", "PLACEHOLDERS", "load_prompt", "parse_template"]

# The templates live in the repository's prompts/; a wheel carries them as refine_llm/prompt_templates/
# (copied there by setup.py's build step), so an installed package finds them without a checkout.
_HERE = Path(__file__).resolve().parent
PROMPTS_DIR = next((d for d in (_HERE / "prompt_templates", _HERE.parent / "prompts") if d.is_dir()),
                   _HERE.parent / "prompts")
BUILTIN_PROMPTS: dict[str, str] = {"paper": "fill_in_blank.txt", "qa": "qa.txt", "chat": "chat.txt"}
PLACEHOLDERS = ("[context]", "[question]")
ROLES = ("system", "user", "assistant")

_SECTION_RE = re.compile(r"^### (system|user|assistant)\s*$", re.MULTILINE)
_NEAR_RE = re.compile(r"\[\s*(context|question)\s*\]|\{\s*(context|question)\s*\}", re.IGNORECASE)
# Sentinels that no real context contains, to find where the placeholders land after templating.
_S_CONTEXT, _S_QUESTION = "\x00CONTEXT\x00", "\x00QUESTION\x00"


@dataclass(frozen=True)
class PromptTemplate:
    """A loaded template. ``kind`` is "text" or "chat" (``messages`` = [(role, content)] for chat)."""

    name: str
    text: str
    fingerprint: str
    kind: str = "text"
    source: str = ""
    messages: tuple[tuple[str, str], ...] = field(default=())

    @property
    def add_special_tokens(self) -> bool:
        """Whether to let the tokenizer add BOS: a chat template already writes its own."""
        return self.kind != "chat"

    def _fill(self, s: str, context: str, question: str) -> str:
        # One pass, so that a context containing "[question]" is never substituted twice.
        return re.sub(r"\[(context|question)\]", lambda m: context if m[1] == "context" else question, s)

    def render(self, context: str, question: str, tokenizer=None) -> str:
        """The prompt for one question; chat templates need the ``tokenizer`` (its chat template)."""
        if self.kind == "text":
            return self._fill(self.text, context, question)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"prompt {self.name} ({self.source}) needs a tokenizer with a chat template; this model has none: "
                "use --prompt paper or --prompt qa"
            )
        msgs = [{"role": r, "content": self._fill(c, context, question)} for r, c in self.messages]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def prefix(self, tokenizer=None) -> str:
        """Everything before the first placeholder of the rendered prompt (shared by every prompt)."""
        s = self.render(_S_CONTEXT, _S_QUESTION, tokenizer)
        cut = min(i for i in (s.find(_S_CONTEXT), s.find(_S_QUESTION)) if i >= 0)
        return s[:cut]


def _fingerprint(kind: str, text: str) -> str:
    return hashlib.sha256(f"{kind}\n{text}".encode("utf-8")).hexdigest()[:16]


def _parse_chat(path: Path, text: str) -> tuple[tuple[str, str], ...]:
    parts = _SECTION_RE.split(text)
    if parts[0].strip():
        raise UserError(f"{path}: text before the first '### system/user/assistant' line: move it into a section")
    msgs = tuple((parts[i], parts[i + 1].strip("\n")) for i in range(1, len(parts), 2))
    if not msgs or msgs[-1][0] != "user":
        raise UserError(f"{path}: a chat prompt must end with a '### user' section holding [context] and [question]")
    for i, (role, content) in enumerate(msgs):
        if not content.strip():
            raise UserError(f"{path}: section {i + 1} (### {role}) is empty: write its message or remove it")
    return msgs


def load_prompt(name_or_path: str | Path) -> PromptTemplate:
    """A built-in (``paper``, ``qa``, ``chat``) or a file with ``[context]`` and ``[question]``."""
    key = str(name_or_path)
    if key in BUILTIN_PROMPTS:
        path, name = PROMPTS_DIR / BUILTIN_PROMPTS[key], key
    else:
        path, name = Path(key).expanduser(), key
        if not path.is_file():
            raise UserError(
                f"--prompt {key}: no such built-in prompt or file; use one of {', '.join(BUILTIN_PROMPTS)} "
                "or the path of a text file with [context] and [question]"
            )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason}): save it as UTF-8") from None
    return parse_template(text, name=name, source=str(path))


def parse_template(text: str, name: str, source: str = "") -> PromptTemplate:
    """A template from its text (a file's contents, or a variant built in memory, e.g.
    refine_llm.prompt_variants): the checks and the fingerprint of ``load_prompt``. ``source`` names
    where it came from in error messages."""
    path = source or name
    text = text.rstrip("\n")  # an editor's final newline is not part of the prompt
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        near = _NEAR_RE.findall(text)
        hint = f" (found {', '.join(sorted({m[0] or m[1] for m in near}))} spelled differently: write it in lower case in square brackets)" if near else ""
        raise UserError(f"{path}: missing placeholder {' and '.join(missing)}{hint}: add it where the question's "
                        "text goes")
    kind = "chat" if _SECTION_RE.search(text) else "text"
    messages = _parse_chat(path, text) if kind == "chat" else ()
    if kind == "chat":
        for p in PLACEHOLDERS:
            if p not in messages[-1][1]:
                raise UserError(f"{path}: {p} must be in the last '### user' section")
    return PromptTemplate(name=name, text=text, fingerprint=_fingerprint(kind, text), kind=kind,
                          source=str(path), messages=messages)
