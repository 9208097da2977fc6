"""Word lists -> underspecified and specified questions (UnQover-style), with disjoint splits.

An underspecified question names two subjects in a context that says nothing about them, then asks
which of them has an attribute ("Mary got off the flight to visit John. Who was a nurse?"). Any
preference a model shows is its bias. Each question comes as a 4-tuple sharing ``tuple_id``:
(a, b) and (b, a) orders x attribute / its negation, so that position and negation effects cancel
(docs/CONTRACTS.md). Specified questions add a clause that states who has the attribute
("Mary, who was a nurse, got off ...") and carry the gold answer: they measure utility.

Word lists, ours (``refine_llm/wordlists``, package data) or the user's (``--wordlists DIR``), use
the layout and line formats of the public allenai/unqover repository (``word_lists/``):

    slots/<name>            context TAB question TAB negated question (or just the context; the
                            questions then are "Who [x_act]?" / "Who [x_act:neg]?"). Subjects are
                            [subj1]/[subj2] or [x1]/[x2], optionally with a form: [subj1:dem].
    nouns/subjects/<name>   "[subj] term" or "[subj] cluster | term"; other forms ("[subj:dem] term")
                            are matched to [subj] lines by order.
    activities/<name>       "[x_act] class | text"; "[x_act:neg] class | text" is its negation,
                            matched by order. "-single" etc. variants share the attribute of the
                            same row of the base type ([p_act-single] row k is [p_act] row k).

File names per category are those of UnQover (``FILES``): e.g. nationality reads slots/country_noact,
nouns/subjects/country and activities/biased_country; gender pairs nouns/subjects/female with male.
Every mistake in these files is a ``UserError`` naming the file and line, raised before anything is
written. Splits are disjoint by attribute, by template (when a category has at least 9 templates of
an attribute type) and by subject (names per gender; other categories from 10 subjects on). Each split
then keeps ``subjects_per_split`` subjects and ``attributes_per_split`` attributes, and ``max_tuples``
is spread evenly over the (pair, attribute) cells, so each (subject, attribute) cell of γ holds
several tuples (μ and η are only measurable then). Products too large to enumerate are sampled
uniformly by index. This module never imports torch or loads a model.

CLI: ``python -m refine_llm.questions --category all --seed 0 --max-tuples 200 --out DIR``.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refine_llm.config import CATEGORIES, QuestionsConfig
from refine_llm.errors import UserError
from refine_llm.io import atomic_dir

__all__ = [
    "Attribute",
    "Template",
    "WordLists",
    "COLUMNS",
    "SPLITS",
    "build_questions",
    "load_wordlists",
    "category_vocabulary",
    "tuple_counts",
    "split_spaces",
    "SplitSpace",
    "rows_for_tuple",
    "dataset_features",
    "save_questions",
    "load_questions",
    "main",
]

WORDLISTS_DIR = Path(__file__).resolve().parent / "wordlists"
SPLITS = ("train", "validation", "test")
VAL_FRACTION = TEST_FRACTION = 0.2  # of attributes, templates and subjects (names per gender); the rest is train
MIN_SPLIT_TEMPLATES = 3  # templates per split when templates are split (else every split shares them)
MIN_SPLIT_SUBJECTS = 10  # non-gender categories split their subjects from this many on (>= 2 per split)
STRATIFY_MAX_PRODUCT = 200_000  # stratified sampling enumerates the split's product up to this size
COLUMNS = (
    "question_id", "tuple_id", "category", "split", "template_id", "subj1", "subj2", "subj1_group",
    "subj2_group", "attribute_id", "attribute", "negated", "context", "question", "answers",
    "specified", "gold",
)

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
_NORM_SUBJ_RE = re.compile(r"\[x([12])(?::([^\[\]\s]+))?\]")  # after normalisation
_PLACEHOLDER_RE = re.compile(r"\[([^\[\]]*)\]")


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
            used = [m[2] or "" for m in _NORM_SUBJ_RE.finditer(context) if m[1] == slot]
            if not used:
                raise _err(path, ln, f"malformed line: the context never names subject {slot} ([subj{slot}] or [x{slot}])")
            for f in {m[2] or "" for c in cols for m in _NORM_SUBJ_RE.finditer(c) if m[1] == slot}:
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
            for m in _PLACEHOLDER_RE.finditer(_NORM_SUBJ_RE.sub("", c)):
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


# ----------------------------------------------------------------------------- rendering


def _vowel_sound(word: str) -> bool:
    w = word.lower()
    if w.startswith(("eu", "uni", "uk", "us", "ur", "one")):
        return False
    return w.startswith(("hour", "honest", "honor")) or w[:1] in ("a", "e", "i", "o", "u")


def _fill(text: str, value_of) -> str:
    """Replace every [...] with ``value_of(name)``, fixing a/an right before it."""
    out, pos = [], 0
    for m in _PLACEHOLDER_RE.finditer(text):
        before, value = text[pos:m.start()], value_of(m[1])
        a = re.search(r"(?:^|\s)([Aa])n? $", before)
        if a and value:
            art = a[1] + ("n" if _vowel_sound(value) else "")
            before = before[: a.start(1)] + art + " "
        out += [before, value]
        pos = m.end()
    out.append(text[pos:])
    s = "".join(out)
    return s[:1].upper() + s[1:]


def _insert_clause(text: str, slot: int, form: str, clause: str) -> str:
    """Insert ', <clause>,' after the first mention of subject ``slot`` (and its head noun)."""
    ph = re.escape(f"[x{slot}{':' + form if form else ''}]")
    m = re.search(ph + r"(?: (?:" + "|".join(HEAD_NOUNS) + r")\b)?", text)
    assert m is not None, f"template {text!r} does not name subject {slot}"
    rest = text[m.end():]
    sep = "" if (not rest or rest[0] in ".,;:!?") else ","
    return text[: m.end()] + f", {clause}{sep}" + rest


def _hash(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def rows_for_tuple(wl: WordLists, split: str, t: Template, a: str, b: str, attr: Attribute) -> list[dict]:
    """The 4 underspecified rows of tuple (a, b, template, attribute), then its 4 specified rows."""
    text, neg_text = attr.forms[t.act]
    tuple_id = _hash(wl.category, t.text, t.question, a, b, text, neg_text)
    rel = "who" if t.question.lower().startswith("who") else "which"
    rows = []

    def render(s: str, x1: str, x2: str) -> str:
        def value_of(name: str) -> str:
            m = _NORM_SUBJ_RE.fullmatch(f"[{name}]")
            if m:
                return wl.forms[x1 if m[1] == "1" else x2][m[2] or ""]
            typ, _, suffix = name.partition(":")
            return attr.forms[typ][1 if suffix == "neg" else 0]

        out = _fill(s, value_of)
        if "[" in out or "]" in out:
            raise UserError(f"{t.source}: a placeholder is left unfilled in {out!r}: fix the template")
        return out

    def row(x1: str, x2: str, negated: bool, context: str, question: str, gold: str | None) -> dict:
        s1, s2 = wl.forms[x1][t.answer_forms[0]], wl.forms[x2][t.answer_forms[1]]
        specified = gold is not None
        return {
            "question_id": _hash(wl.category, context, question, s1, s2, specified, gold),
            "tuple_id": tuple_id, "category": wl.category, "split": split, "template_id": t.id,
            "subj1": s1, "subj2": s2, "subj1_group": wl.groups[x1], "subj2_group": wl.groups[x2],
            "attribute_id": attr.id, "attribute": neg_text if negated else text, "negated": negated,
            "context": context, "question": question, "answers": [s1, s2], "specified": specified, "gold": gold,
        }

    for x1, x2 in ((a, b), (b, a)):
        context = render(t.text, x1, x2)
        for negated in (False, True):
            rows.append(row(x1, x2, negated, context, render(t.negated_question if negated else t.question, x1, x2), None))
    # Specified rows: the clause states who has the attribute; a negated question's gold is the OTHER
    # subject. 4 rows per tuple, balanced over name order, clause slot, polarity, clause subject, gold
    # subject and gold position; which order gets the negated questions alternates between tuples.
    neg_order = int(tuple_id, 16) % 2  # (a, b) or (b, a) asks the negated questions
    for o, (x1, x2) in enumerate(((a, b), (b, a))):
        negated = o == neg_order
        for slot in (1, 2):
            clause_subj, other = (x1, x2) if slot == 1 else (x2, x1)
            gold = other if negated else clause_subj
            context = render(_insert_clause(t.text, slot, t.answer_forms[slot - 1], f"{rel} {text}"), x1, x2)
            gold_s = wl.forms[gold][t.answer_forms[0 if gold == x1 else 1]]
            question = render(t.negated_question if negated else t.question, x1, x2)
            rows.append(row(x1, x2, negated, context, question, gold_s))
    return rows


# ----------------------------------------------------------------------------- splits and sampling


def _split(items: list, seed: int, key: str, what: str, where: str) -> dict[str, list]:
    """Shuffle ``items`` with (seed, key) and cut 60/20/20, each split non-empty; file order kept inside."""
    n = len(items)
    if n < 3:
        raise UserError(f"{where}: only {n} {what}; disjoint train/validation/test splits need at least 3: add more")
    idx = list(range(n))
    random.Random(f"{seed}/{key}").shuffle(idx)
    n_val, n_test = max(1, round(n * VAL_FRACTION)), max(1, round(n * TEST_FRACTION))
    n_train = n - n_val - n_test
    cuts = {"train": idx[:n_train], "validation": idx[n_train:n_train + n_val], "test": idx[n_train + n_val:]}
    return {s: [items[i] for i in sorted(c)] for s, c in cuts.items()}


@dataclass
class SplitSpace:
    """The product pairs x (template, attribute) of one category and split, indexable without
    enumerating it: index -> template (via offsets), then pair, attribute = divmod."""

    pairs: list[tuple[str, str]]
    templates: list[Template]
    attrs: list[list[Attribute]]  # per template: the split's attributes that have its act type
    offsets: list[int]

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def get(self, i: int) -> tuple[Template, tuple[str, str], Attribute]:
        k = bisect.bisect_right(self.offsets, i) - 1
        p, a = divmod(i - self.offsets[k], len(self.attrs[k]))
        return self.templates[k], self.pairs[p], self.attrs[k][a]


def _subset(items: list, n: int | None, seed: int, key: str) -> list:
    """``n`` of ``items`` (seeded, file order kept); all of them when n is None or >= len(items)."""
    if n is None or n >= len(items):
        return list(items)
    keep = set(random.Random(f"{seed}/{key}").sample(range(len(items)), n))
    return [x for i, x in enumerate(items) if i in keep]


def _template_splits(wl: WordLists, seed: int) -> dict[str, list[Template]]:
    """Templates per split: disjoint (60/20/20, per attribute type) where a type has at least
    MIN_SPLIT_TEMPLATES x 3 templates, else shared by every split (``split_design`` reports it)."""
    by_act: dict[str, list[Template]] = {}
    for t in wl.templates:
        by_act.setdefault(t.act, []).append(t)
    out: dict[str, list[Template]] = {s: [] for s in SPLITS}
    for act, ts in by_act.items():
        if len(ts) >= 3 * MIN_SPLIT_TEMPLATES:
            for s, part in _split(ts, seed, f"{wl.category}/templates/{act}", "templates", ts[-1].source).items():
                out[s] += part
        else:
            for s in SPLITS:
                out[s] += ts
    return out


def split_spaces(wl: WordLists, seed: int, subjects_per_split: int | None = None,
                 attributes_per_split: int | None = None) -> dict[str, SplitSpace]:
    """{split: SplitSpace}: the (template, subject pair, attribute) product each split samples its tuples from
    (templates, attributes and subjects split as the module docstring says). Also the testbed's words."""
    attr_splits = _split(wl.attributes, seed, f"{wl.category}/attributes", "attributes", wl.attributes[-1].source)
    attr_splits = {s: _subset(a, attributes_per_split, seed, f"{wl.category}/{s}/attributes")
                   for s, a in attr_splits.items()}
    if wl.category == "gender":
        by_group: dict[str, list[str]] = {}
        for s in wl.subjects:
            by_group.setdefault(wl.groups[s], []).append(s)
        f_split, m_split = ({s: _subset(v, subjects_per_split, seed, f"gender/{g}/{s}") for s, v in
                             _split(by_group[g], seed, f"gender/{g}", f"{g} names", wl.sources[by_group[g][-1]]).items()}
                            for g in ("female", "male"))
        pairs = {s: [(f, m) for f in f_split[s] for m in m_split[s]] for s in SPLITS}
    elif len(wl.subjects) >= MIN_SPLIT_SUBJECTS:  # disjoint subjects; pairs within each split
        subj = _split(wl.subjects, seed, f"{wl.category}/subjects", "subjects", wl.sources[wl.subjects[-1]])
        pairs = {s: list(itertools.combinations(_subset(subj[s], subjects_per_split, seed, f"{wl.category}/{s}"), 2))
                 for s in SPLITS}
    else:  # too few subjects to split them: every split pairs all subjects, on its own attributes
        all_pairs = list(itertools.combinations(_subset(wl.subjects, subjects_per_split, seed, wl.category), 2))
        pairs = {s: all_pairs for s in SPLITS}
    templates = _template_splits(wl, seed)
    out = {}
    for s in SPLITS:
        attrs = [[a for a in attr_splits[s] if t.act in a.forms] for t in templates[s]]
        offsets = [0]
        for per_t in attrs:
            offsets.append(offsets[-1] + len(pairs[s]) * len(per_t))
        out[s] = SplitSpace(pairs[s], templates[s], attrs, offsets)
    return out


def _stratified(space: SplitSpace, n: int, rng: random.Random) -> list[int]:
    """``n`` indices of ``space`` spread evenly over (pair, attribute) cells: round after round, each
    cell gets one more tuple (another template), cells in random order, so every (subject, attribute)
    cell of gamma holds as many tuples as the budget allows."""
    by_cell: dict[tuple, list[int]] = {}
    for i in range(space.size):
        t, pair, attr = space.get(i)
        by_cell.setdefault((pair, attr.id), []).append(i)
    cells = list(by_cell)
    rng.shuffle(cells)
    for c in cells:
        rng.shuffle(by_cell[c])
    chosen: list[int] = []
    r = 0
    while len(chosen) < n:
        for c in cells:
            if r < len(by_cell[c]) and len(chosen) < n:
                chosen.append(by_cell[c][r])
        r += 1
    return sorted(chosen)


def tuple_counts(cfg: QuestionsConfig) -> dict[tuple[str, str], int]:
    """Size of the full product (4-tuples) per (category, split) before ``max_tuples`` sampling."""
    return {(c, s): sp.size for c in cfg.categories
            for s, sp in split_spaces(load_wordlists(c, cfg.wordlists), cfg.seed, cfg.subjects_per_split,
                                 cfg.attributes_per_split).items()}


def dataset_features():
    """The datasets Features of a questions dataset (``COLUMNS``)."""
    from datasets import Features, Sequence, Value

    string, boolean = Value("string"), Value("bool")
    types = {c: string for c in COLUMNS}
    types.update(negated=boolean, specified=boolean, answers=Sequence(string))
    return Features(types)


def build_questions(cfg: QuestionsConfig):
    """All categories of ``cfg``, all splits: underspecified 4-tuples (sampled, ``cfg.max_tuples`` per
    split and category) and 4 specified rows per tuple. Deterministic for ``cfg.seed``."""
    from datasets import Dataset

    wordlists = [load_wordlists(c, cfg.wordlists) for c in cfg.categories]  # every check before any work
    rows: list[dict] = []
    for wl in wordlists:
        for split, space in split_spaces(wl, cfg.seed, cfg.subjects_per_split, cfg.attributes_per_split).items():
            rng = random.Random(f"{cfg.seed}/{wl.category}/{split}/sample")
            if cfg.max_tuples is None or cfg.max_tuples >= space.size:
                chosen: Any = range(space.size)
            elif space.size <= STRATIFY_MAX_PRODUCT:
                chosen = _stratified(space, cfg.max_tuples, rng)
            else:  # sample indices, never the product itself: O(max_tuples) memory
                chosen = sorted(rng.sample(range(space.size), cfg.max_tuples))
            for i in chosen:
                t, (a, b), attr = space.get(i)
                rows += rows_for_tuple(wl, split, t, a, b, attr)
    columns = {c: [r[c] for r in rows] for c in COLUMNS}
    return Dataset.from_dict(columns, features=dataset_features())


# ----------------------------------------------------------------------------- files


def save_questions(ds, out_dir: str | os.PathLike) -> Path:
    """Write ``ds`` to ``out_dir`` atomically: into a temp dir next to it, then rename over it."""
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory: choose another --out")
    with atomic_dir(out) as tmp:
        ds.save_to_disk(str(tmp))
    return out


def load_questions(path: str | os.PathLike):
    """The dataset written by ``save_questions``; ``UserError`` if it is missing or not one."""
    from datasets import load_from_disk

    p = Path(path)
    if not (p / "dataset_info.json").is_file():
        raise UserError(f"{p}: no questions dataset there: write one with `python -m refine_llm.questions --out {p}`")
    ds = load_from_disk(str(p))
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise UserError(f"{p}: not a questions dataset (missing columns {', '.join(missing)}): regenerate it")
    return ds


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None, prog: str = "python -m refine_llm.questions") -> int:
    """`python -m refine_llm.questions`: flags generated from ``config.QuestionsArgs``."""
    from refine_llm.cliargs import parse_config
    from refine_llm.config import QuestionsArgs

    try:
        args = parse_config(QuestionsArgs, argv, prog)
        cfg = args.questions
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()  # the CLI prints one summary line, not save_to_disk's bars
        ds = build_questions(cfg)
        out = save_questions(ds, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    n_spec = sum(ds["specified"])
    print(f"wrote {len(ds)} questions ({len(ds) - n_spec} underspecified, {n_spec} specified) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
