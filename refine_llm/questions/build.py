"""Questions from word lists: tuples and specified questions rendered, disjoint splits, stratified samples,
the dataset's columns, and its files (see refine_llm.questions for the design). Never imports torch."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refine_llm.config import QuestionsConfig
from refine_llm.errors import UserError
from refine_llm.io import atomic_dir
from refine_llm.questions.lists import (HEAD_NOUNS, NORM_SUBJ_RE, PLACEHOLDER_RE, Attribute, Template, WordLists,
                                        load_wordlists)

__all__ = ["SPLITS", "COLUMNS", "rows_for_tuple", "SplitSpace", "split_spaces", "tuple_counts", "dataset_features",
           "build_questions", "question_rows", "save_questions", "load_questions", "main"]

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



# ----------------------------------------------------------------------------- rendering


def _vowel_sound(word: str) -> bool:
    w = word.lower()
    if w.startswith(("eu", "uni", "uk", "us", "ur", "one")):
        return False
    return w.startswith(("hour", "honest", "honor")) or w[:1] in ("a", "e", "i", "o", "u")


def _fill(text: str, value_of) -> str:
    """Replace every [...] with ``value_of(name)``, fixing a/an right before it."""
    out, pos = [], 0
    for m in PLACEHOLDER_RE.finditer(text):
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
            m = NORM_SUBJ_RE.fullmatch(f"[{name}]")
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
                 attributes_per_split: int | None = None, whole_train: bool = False) -> dict[str, SplitSpace]:
    """{split: SplitSpace}: the (template, subject pair, attribute) product each split samples its tuples from
    (templates, attributes and subjects split as the module docstring says). Also the testbed's words.
    ``whole_train``: the train split keeps every subject and attribute of its part
    (``QuestionsConfig.train_tuples``); the subsets then apply to validation and test only."""
    keep = {s: (None, None) if whole_train and s == "train" else (subjects_per_split, attributes_per_split)
            for s in SPLITS}
    attr_splits = _split(wl.attributes, seed, f"{wl.category}/attributes", "attributes", wl.attributes[-1].source)
    attr_splits = {s: _subset(a, keep[s][1], seed, f"{wl.category}/{s}/attributes")
                   for s, a in attr_splits.items()}
    if wl.category == "gender":
        by_group: dict[str, list[str]] = {}
        for s in wl.subjects:
            by_group.setdefault(wl.groups[s], []).append(s)
        f_split, m_split = ({s: _subset(v, keep[s][0], seed, f"gender/{g}/{s}") for s, v in
                             _split(by_group[g], seed, f"gender/{g}", f"{g} names", wl.sources[by_group[g][-1]]).items()}
                            for g in ("female", "male"))
        pairs = {s: [(f, m) for f in f_split[s] for m in m_split[s]] for s in SPLITS}
    elif len(wl.subjects) >= MIN_SPLIT_SUBJECTS:  # disjoint subjects; pairs within each split
        subj = _split(wl.subjects, seed, f"{wl.category}/subjects", "subjects", wl.sources[wl.subjects[-1]])
        pairs = {s: list(itertools.combinations(_subset(subj[s], keep[s][0], seed, f"{wl.category}/{s}"), 2))
                 for s in SPLITS}
    else:  # too few subjects to split them: every split pairs all subjects, on its own attributes
        pairs = {s: list(itertools.combinations(_subset(wl.subjects, keep[s][0], seed, wl.category), 2))
                 for s in SPLITS}
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
                                      cfg.attributes_per_split, cfg.train_tuples is not None).items()}


def dataset_features():
    """The datasets Features of a questions dataset (``COLUMNS``)."""
    from datasets import Features, Sequence, Value

    string, boolean = Value("string"), Value("bool")
    types = {c: string for c in COLUMNS}
    types.update(negated=boolean, specified=boolean, answers=Sequence(string))
    return Features(types)


def question_rows(cfg: QuestionsConfig) -> list[dict]:
    """The rows of ``build_questions`` as plain dicts (keys ``COLUMNS``), without ``datasets``: for
    callers on a machine that has only torch and transformers (eval/gpu_check.py)."""
    wordlists = [load_wordlists(c, cfg.wordlists) for c in cfg.categories]  # every check before any work
    rows: list[dict] = []
    for wl in wordlists:
        for split, space in split_spaces(wl, cfg.seed, cfg.subjects_per_split, cfg.attributes_per_split,
                                         cfg.train_tuples is not None).items():
            rng = random.Random(f"{cfg.seed}/{wl.category}/{split}/sample")
            n = cfg.train_tuples if split == "train" and cfg.train_tuples is not None else cfg.max_tuples
            if n is None or n >= space.size:
                chosen: Any = range(space.size)
            elif space.size <= STRATIFY_MAX_PRODUCT:
                chosen = _stratified(space, n, rng)
            else:  # sample indices, never the product itself: O(n) memory
                chosen = sorted(rng.sample(range(space.size), n))
            for i in chosen:
                t, (a, b), attr = space.get(i)
                rows += rows_for_tuple(wl, split, t, a, b, attr)
    return rows


def build_questions(cfg: QuestionsConfig):
    """All categories of ``cfg``, all splits: underspecified 4-tuples (sampled, ``cfg.max_tuples`` per
    split and category, ``cfg.train_tuples`` for train when set) and 4 specified rows per tuple.
    Deterministic for ``cfg.seed``."""
    from datasets import Dataset

    rows = question_rows(cfg)
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
