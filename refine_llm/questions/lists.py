"""Word lists in the UnQover format: read and checked, every mistake a one-line UserError naming file and line.

Ours (``refine_llm/wordlists``, package data) or the user's (``--wordlists DIR``) use the layout and line
formats of the public allenai/unqover repository (``word_lists/``); see refine_llm.questions. This module
never imports torch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refine_llm.config import CATEGORIES
from refine_llm.errors import UserError

__all__ = ["WORDLISTS_DIR", "FILES", "HEAD_NOUNS", "PLACEHOLDER_RE", "NORM_SUBJ_RE", "Attribute", "Template", "WordLists",
           "load_wordlists", "category_vocabulary", "category_subjects"]

WORDLISTS_DIR = Path(__file__).resolve().parents[1] / "wordlists"

# UnQover file names per category; the first that exists wins. Gender reads one file per group.
FILES: dict[str, dict[str, Any]] = {
    "gender": {
        "slots": ("gender_noact", "gender"),
        "subjects": {"female": ("female",), "male": ("male",)},
        "activities": ("occupation_rev1", "occupation", "gender"),
    },
    "nationality": {
        "slots": ("country_noact", "nationality_noact", "country", "nationality"),
        "subjects": {None: ("country", "nationality")},
        "activities": ("biased_country", "biased_nationality"),
    },
    "ethnicity": {
        "slots": ("ethnicity_noact", "ethnicity"),
        "subjects": {None: ("ethnicity",)},
        "activities": ("biased_ethnicity",),
    },
    "religion": {
        "slots": ("religion_noact", "religion"),
        "subjects": {None: ("religion",)},
        "activities": ("biased_religion",),
    },
}

# A person noun right after a subject placeholder belongs to its noun phrase: the specified clause
# goes after it ("The Kenyan man, who was a pilot, got off ...").
HEAD_NOUNS = ("man", "woman", "boy", "girl", "person", "student", "guy", "lady", "family", "couple", "people")
DEFAULT_QUESTION = "Who [x_act]?"
DEFAULT_NEGATED_QUESTION = "Who [x_act:neg]?"

_HEAD_RE = re.compile(r"^\[([^\[\]\s]+)\]\s*(.*)$")
_SUBJ_RE = re.compile(r"\[(?:subj|x)([12])(?::([^\[\]\s]+))?\]")  # [subj1], [x2], [subj1:dem]
NORM_SUBJ_RE = re.compile(r"\[x([12])(?::([^\[\]\s]+))?\]")  # after normalisation
PLACEHOLDER_RE = re.compile(r"\[([^\[\]]*)\]")




@dataclass
class Attribute:
    """One attribute and its negation. ``forms`` maps an act type ("x_act", "p_act-single") to
    (text, negated text); ``text``/``negated_text`` are the base form."""

    id: str
    text: str
    negated_text: str
    cls: str = ""
    forms: dict[str, tuple[str, str]] = field(default_factory=dict)
    source: str = ""  # "file:line", for messages


@dataclass
class Template:
    """A context with [x1]/[x2] slots (``[x1:dem]`` picks a subject form) and the two questions,
    each with the act placeholder ``[act]`` / ``[act:neg]``."""

    id: str
    text: str
    question: str = DEFAULT_QUESTION
    negated_question: str = DEFAULT_NEGATED_QUESTION
    act: str = "x_act"
    answer_forms: tuple[str, str] = ("", "")  # subject form that is the answer string, per slot
    source: str = ""  # "file:line", for messages


@dataclass
class WordLists:
    """Everything one category needs. ``subjects`` are canonical terms ([subj] lines); ``forms``
    maps each to its surface forms ("" = canonical, "dem", "country", ...)."""

    category: str
    subjects: list[str]
    groups: dict[str, str]
    attributes: list[Attribute]
    templates: list[Template]
    forms: dict[str, dict[str, str]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # subject -> "file:line"


# ----------------------------------------------------------------------------- parsing


def _err(path: Path, line: int, msg: str) -> UserError:
    return UserError(f"{path}:{line}: {msg}")


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank, non-comment lines."""
    try:
        raw = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason}): save it as UTF-8") from None
    return [(i, s.strip()) for i, s in enumerate(raw, 1) if s.strip() and not s.strip().startswith("#")]


def _split_entry(path: Path, line: int, rest: str, what: str) -> tuple[str, str]:
    """'cluster | text' or 'text' -> (cluster, text)."""
    parts = [p.strip() for p in rest.split("|")]
    if len(parts) > 2 or not parts[-1] or (len(parts) == 2 and not parts[0]):
        raise _err(path, line, f"malformed line {rest!r}: expected '{what}'")
    if any(c in parts[-1] for c in "[]\t"):
        raise _err(path, line, f"malformed line: {parts[-1]!r} contains '[', ']' or a tab; remove them")
    return (parts[0] if len(parts) == 2 else ""), parts[-1]


@dataclass
class _Subject:
    term: str
    cluster: str
    forms: dict[str, str]
    where: str  # "file:line"


def _parse_subjects(path: Path) -> list[_Subject]:
    by_head: dict[str, list[tuple[int, str, str]]] = {}
    for ln, line in _read_lines(path):
        m = _HEAD_RE.match(line)
        head = m.group(1) if m else ""
        if not m or not (head == "subj" or head.startswith("subj:")):
            raise _err(path, ln, f"malformed line {line!r}: expected '[subj] term' or '[subj] cluster | term'")
        cluster, term = _split_entry(path, ln, m.group(2), "[subj] cluster | term")
        by_head.setdefault(head, []).append((ln, cluster, term))
    base = by_head.get("subj", [])
    for head, entries in by_head.items():
        if len(entries) != len(base):
            ln = entries[len(base)][0] if len(entries) > len(base) else entries[-1][0]
            raise _err(path, ln, f"{len(entries)} [{head}] lines but {len(base)} [subj] lines: forms are "
                                 "matched to subjects by order, so give each subject exactly one")
    out = []
    for k, (ln, cluster, term) in enumerate(base):
        forms = {("" if h == "subj" else h.split(":", 1)[1]): entries[k][2] for h, entries in by_head.items()}
        out.append(_Subject(term, cluster, forms, f"{path}:{ln}"))
    return out


def _parse_activities(path: Path, category: str) -> list[Attribute]:
    by_head: dict[str, list[tuple[int, str, str]]] = {}
    for ln, line in _read_lines(path):
        m = _HEAD_RE.match(line)
        head = m.group(1) if m else ""
        typ, _, suffix = head.partition(":")
        if not m or not typ or suffix not in ("", "neg"):
            raise _err(path, ln, f"malformed line {line!r}: expected '[x_act] class | text' or '[x_act:neg] class | text'")
        cls, text = _split_entry(path, ln, m.group(2), "[x_act] class | text")
        by_head.setdefault(head, []).append((ln, cls, text))
    types = [h for h in by_head if not h.endswith(":neg")]
    for h, entries in by_head.items():
        if h.endswith(":neg") and h[:-4] not in by_head:
            raise _err(path, entries[0][0], f"negation [{h}] has no [{h[:-4]}] lines to negate")
    for t in types:
        pos, neg = by_head[t], by_head.get(t + ":neg", [])
        if len(pos) > len(neg):
            ln, _, text = pos[len(neg)]
            raise _err(path, ln, f"attribute {text!r} has no negation: add its [{t}:neg] line "
                                 "(negations are matched to attributes by order)")
        if len(neg) > len(pos):
            ln, _, text = neg[len(pos)]
            raise _err(path, ln, f"negation {text!r} has no attribute: each [{t}:neg] line needs a [{t}] line")
    # Variants ("p_act-single") share the attribute id of the same row of their base ("p_act").
    bases: dict[str, list[str]] = {}
    for t in types:
        bases.setdefault(t.split("-", 1)[0], []).append(t)
    attributes = []
    for base, members in bases.items():
        main = base if base in members else members[0]
        n = len(by_head[main])
        for t in members:
            if len(by_head[t]) != n:
                ln = by_head[t][n][0] if len(by_head[t]) > n else by_head[t][-1][0]
                raise _err(path, ln, f"{len(by_head[t])} [{t}] lines but {n} [{main}] lines: variants are "
                                     "matched to attributes by order, so give each attribute exactly one")
        for k in range(n):
            forms = {t: (by_head[t][k][2], by_head[t + ":neg"][k][2]) for t in members}
            attributes.append(Attribute(f"{category}/{base}-{k:03d}", forms[main][0], forms[main][1],
                                        by_head[main][k][1], forms, f"{path}:{by_head[main][k][0]}"))
    return attributes


def _parse_slots(path: Path, category: str, subject_forms: set[str], act_types: dict[str, Path]) -> list[Template]:
    templates = []
    for ln, line in _read_lines(path):
        cols = [c.strip() for c in line.split("\t") if c.strip()]
        if len(cols) == 1:
            cols += [DEFAULT_QUESTION, DEFAULT_NEGATED_QUESTION]
        if len(cols) != 3:
            raise _err(path, ln, f"malformed line: {len(cols)} tab-separated columns; expected the context "
                                 "alone, or context TAB question TAB negated question")
        # [subj1:dem] -> [x1:dem], [subj2] -> [x2]
        cols = [_SUBJ_RE.sub(lambda m: f"[x{m[1]}{':' + m[2] if m[2] else ''}]", c) for c in cols]
        context, q, nq = cols
        answer_forms = []
        for slot in "12":
            used = [m[2] or "" for m in NORM_SUBJ_RE.finditer(context) if m[1] == slot]
            if not used:
                raise _err(path, ln, f"malformed line: the context never names subject {slot} ([subj{slot}] or [x{slot}])")
            for f in {m[2] or "" for c in cols for m in NORM_SUBJ_RE.finditer(c) if m[1] == slot}:
                if f not in subject_forms:
                    raise _err(path, ln, f"placeholder [subj{slot}:{f}] has no filler: the subject files have "
                                         f"no [subj:{f}] lines for every subject; add them or change the template")
            answer = [f for f in dict.fromkeys(used) if not f.startswith("tag_")]
            if len(answer) != 1:
                raise _err(path, ln, f"malformed line: subject {slot} appears in forms {answer}; use one form "
                                     "(tag_ forms aside) so that the answer string is clear")
            answer_forms.append(answer[0])
        acts = set()
        for c in cols:
            for m in PLACEHOLDER_RE.finditer(NORM_SUBJ_RE.sub("", c)):
                typ, _, suffix = m[1].partition(":")
                if typ not in act_types or suffix not in ("", "neg"):
                    known = ", ".join(f"[{t}]" for t in act_types) or "none"
                    raise _err(path, ln, f"placeholder [{m[1]}] has no filler (attribute types: {known}): "
                                         "fix the placeholder or add its lines to the activities file")
                acts.add(typ)
        if len(acts) != 1 or f"[{next(iter(acts))}]" not in q or f"[{next(iter(acts))}:neg]" not in nq:
            raise _err(path, ln, "malformed line: the question must contain one attribute placeholder such as "
                                 "[x_act] and the negated question its [x_act:neg]")
        templates.append(Template(f"{category}/t{len(templates):02d}", context, q, nq, acts.pop(),
                                  (answer_forms[0], answer_forms[1]), f"{path}:{ln}"))
    if not templates:
        raise UserError(f"{path}:1: no templates: add at least one line with [subj1] and [subj2]")
    return templates


def _find(root: Path, kind: str, names: tuple[str, ...], category: str) -> Path:
    for name in names:
        p = root / kind / name
        if p.is_file():
            return p
    raise UserError(f"{root / kind}: no {category} word list there; expected a file named "
                    f"{' or '.join(names)} (UnQover layout)")


def load_wordlists(category: str, wordlists_dir: str | os.PathLike | None = None) -> WordLists:
    """Read and check one category's subjects, attributes and templates; raise ``UserError`` (file and
    line) on any mistake. ``wordlists_dir`` is an UnQover-format directory; None = ours."""
    if category not in CATEGORIES:
        raise UserError(f"unknown category {category!r}: use one of {', '.join(CATEGORIES)}")
    root = Path(wordlists_dir) if wordlists_dir is not None else WORDLISTS_DIR
    if not root.is_dir():
        raise UserError(f"{root}: word-list directory not found: pass a directory with slots/, "
                        "nouns/subjects/ and activities/")
    spec = FILES[category]
    subjects: list[_Subject] = []
    groups: dict[str, str] = {}
    seen: dict[tuple[str, str], str] = {}
    files = []
    for group, names in spec["subjects"].items():
        path = _find(root, "nouns/subjects", names, category)
        entries = _parse_subjects(path)
        if group is not None and not entries:
            raise UserError(f"{path}:1: no {group} subjects: gender needs at least one {group} name")
        for s in entries:
            for form, surface in s.forms.items():
                key = (form, surface.lower())
                if key in seen:
                    raise UserError(f"{s.where}: duplicate subject {surface!r} (first at {seen[key]}): remove one")
                seen[key] = s.where
            groups[s.term] = group if group is not None else s.term
        subjects += entries
        files.append(path)
    if len(subjects) < 2:
        where = subjects[0].where if subjects else f"{files[0]}:1"
        raise UserError(f"{where}: {category} has {len(subjects)} subject(s); questions need at least two: add more")
    forms = {s.term: s.forms for s in subjects}
    subject_forms = set.intersection(*(set(f) for f in forms.values()))
    act_path = _find(root, "activities", spec["activities"], category)
    attributes = _parse_activities(act_path, category)
    if not attributes:
        raise UserError(f"{act_path}:1: no attributes: add '[x_act] class | text' lines and their [x_act:neg] lines")
    act_types = {t: act_path for a in attributes for t in a.forms}
    templates = _parse_slots(_find(root, "slots", spec["slots"], category), category, subject_forms, act_types)
    return WordLists(category, [s.term for s in subjects], groups, attributes, templates, forms,
                     {s.term: s.where for s in subjects})


def category_vocabulary(category: str, wordlists_dir: str | os.PathLike | None = None) -> list[str]:
    """Every surface form of every subject of ``category`` (for serving's gate), in file order."""
    wl = load_wordlists(category, wordlists_dir)
    return list(dict.fromkeys(v for s in wl.subjects for f, v in wl.forms[s].items() if not f.startswith("tag_")))



ARTICLES = ("the ", "a ", "an ")


def category_subjects(category: str, wordlists_dir: str | os.PathLike | None = None) -> list[list[str]]:
    """Per subject of ``category``, its surface forms ("Danish", "Denmark"), each without a leading article
    ("the Netherlands" -> "Netherlands": an answer's first token "The" names nobody). One list per subject,
    for heads that must tell the two named subjects apart (``refine_llm.vocab.gate_vocabulary``)."""
    wl = load_wordlists(category, wordlists_dir)
    out = []
    for s in wl.subjects:
        forms = []
        for f, v in wl.forms[s].items():
            if f.startswith("tag_"):
                continue
            for art in ARTICLES:
                if v.lower().startswith(art) and len(v) > len(art):
                    v = v[len(art):]
            forms.append(v)
        out.append(list(dict.fromkeys(forms)))
    return out
