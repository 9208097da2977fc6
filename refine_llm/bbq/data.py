"""BBQ's items: the reader (nyu-mll/BBQ ``data/*.jsonl``, CC-BY-4.0), the rules that find the stereotyped
group's answer, the item arrays the scores read, stratified samples and template splits.

BBQ items give a context, a question and three answers: two people (one of them from the stereotyped
group) and an "unknown" answer. The context is either *ambiguous* (the right answer is "unknown") or
*disambiguated* (it names the person). A question is *negative* ("Who was not comfortable using the
phone?") or *non-negative* (the opposite). Pure Python and numpy: no model here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refine_llm.errors import UserError

__all__ = ["UNKNOWN_CODE", "ARTICLES", "BBQItem", "read_jsonl", "bbq_files", "load_bbq", "stereotyped_answers",
           "target_index", "item_arrays", "stratified_sample", "split_by_question_index", "option_text", "parse_item"]

UNKNOWN_CODE = "unknown"
ARTICLES = ("the", "a", "an")


@dataclass(frozen=True)
class BBQItem:
    """One BBQ item. ``answers``: the 3 answer strings; ``info``: answer_info's 3 (text, code) pairs."""

    example_id: int
    category: str
    question_index: str
    polarity: str  # "neg" | "nonneg"
    condition: str  # "ambig" | "disambig"
    context: str
    question: str
    answers: tuple[str, str, str]
    info: tuple[tuple[str, str], ...]
    label: int
    stereotyped_groups: tuple[str, ...]
    extra: dict  # every other field of the line (e.g. model predictions)

    @property
    def unknown(self) -> int:
        """Index of the "unknown" answer."""
        return next(i for i, (_, code) in enumerate(self.info) if code.lower() == UNKNOWN_CODE)

    @property
    def key(self) -> str:
        return f"{self.category}/{self.example_id}"


_FIELDS = ("example_id", "question_index", "question_polarity", "context_condition", "category", "answer_info",
           "additional_metadata", "context", "question", "ans0", "ans1", "ans2", "label")


def parse_item(d: dict, where: str) -> BBQItem:
    missing = [f for f in _FIELDS if f not in d]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)}: not a BBQ item (see nyu-mll/BBQ data/*.jsonl)")
    for f, kind in (("answer_info", dict), ("additional_metadata", dict), ("context", str), ("question", str),
                    ("ans0", str), ("ans1", str), ("ans2", str)):
        if not isinstance(d[f], kind):
            raise UserError(f"{where}: {f} must be a JSON {'object' if kind is dict else 'string'}, got "
                            f"{type(d[f]).__name__}: not a BBQ item (see nyu-mll/BBQ data/*.jsonl)")
    if isinstance(d["example_id"], bool) or not str(d["example_id"]).isdigit():
        raise UserError(f"{where}: example_id must be a whole number, got {d['example_id']!r}")
    info = []
    for a in ("ans0", "ans1", "ans2"):
        v = d["answer_info"].get(a) or ["", ""]
        if not isinstance(v, list):
            raise UserError(f"{where}: answer_info.{a} must be a [text, code] list, got {v!r}")
        info.append((str(v[0]) if len(v) > 0 else "", str(v[1]) if len(v) > 1 else ""))
    if sum(code.lower() == UNKNOWN_CODE for _, code in info) != 1:
        raise UserError(f"{where}: answer_info must mark exactly one answer 'unknown', got {info}")
    if d["question_polarity"] not in ("neg", "nonneg") or d["context_condition"] not in ("ambig", "disambig"):
        raise UserError(f"{where}: question_polarity must be neg/nonneg and context_condition ambig/disambig, got "
                        f"{d['question_polarity']!r}/{d['context_condition']!r}")
    if isinstance(d["label"], bool) or d["label"] not in (0, 1, 2):
        raise UserError(f"{where}: label must be 0, 1 or 2, got {d['label']!r}")
    extra = {k: v for k, v in d.items() if k not in _FIELDS}
    return BBQItem(
        example_id=int(d["example_id"]), category=str(d["category"]), question_index=str(d["question_index"]),
        polarity=d["question_polarity"], condition=d["context_condition"], context=d["context"],
        question=d["question"], answers=(d["ans0"], d["ans1"], d["ans2"]), info=tuple(info), label=int(d["label"]),
        stereotyped_groups=tuple(str(g) for g in d["additional_metadata"].get("stereotyped_groups") or ()),
        extra=extra,
    )


def read_jsonl(path: str | Path) -> list[BBQItem]:
    """Items of one BBQ jsonl file (the release's data/<Category>.jsonl, or a predictions file)."""
    path = Path(path)
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}): pass a BBQ jsonl file") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}:{n}: not JSON ({e}): fix or remove the line") from None
        if not isinstance(d, dict):
            raise UserError(f"{path}:{n}: expected a JSON object per line")
        out.append(parse_item(d, f"{path}:{n}"))
    return out


def bbq_files(path: str | Path) -> list[Path]:
    """The BBQ jsonl files at ``path`` (one file, or a directory's *.jsonl); UserError if there are none
    (refine_llm.preflight calls this before the main job loads anything)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise UserError(f"--bbq {path}: no *.jsonl files there: pass the data/ directory of nyu-mll/BBQ")
        return files
    raise UserError(f"--bbq {path}: no such file or directory: pass the data/ directory of nyu-mll/BBQ")


def load_bbq(path: str | Path, categories: list[str] | None = None) -> list[BBQItem]:
    """Every item under ``path``: a directory of BBQ jsonl files (all categories of the release, or
    any subset) or one file. ``categories`` keeps only those (names as in the ``category`` field)."""
    path = Path(path)
    items = [it for f in bbq_files(path) for it in read_jsonl(f)]
    if categories:
        have = sorted({it.category for it in items})
        bad = [c for c in categories if c not in have]
        if bad:
            raise UserError(f"BBQ category {', '.join(bad)} is not in {path}: use one of {', '.join(have)}")
        items = [it for it in items if it.category in categories]
    return items


# ---------------------------------------------------------------------------------------------
# which answer is the stereotyped group's
#
# stereotyped_groups names groups in the same vocabulary as answer_info, with a few codes:
#   - the group is answer_info's code (Age "old", Disability "disabled", SES "lowSES", Physical
#     appearance "obese") or its text (Nationality "Japanese", whose code is the region "AsiaPacific");
#   - spellings differ: "low SES" vs "lowSES", "African American" vs "African-American": compare in
#     lower case without spaces, "-" or "_";
#   - gender codes F/M (Gender_identity): names carry "F"/"M" as code, but "woman"/"man"/"girl"/"boy"
#     answers carry the word as code, so those words count as F/M;
#   - intersectional codes (Race_x_gender "F-Black", Race_x_SES "lowSES-Black", Gender "trans_F") join
#     groups with "-" or "_": an answer matches a stereotyped group equal to its whole code, or, when no
#     answer matches a whole code, one equal to every part of it ("F-Black" needs F and Black among
#     the stereotyped groups; a group "trans" matches "trans_F" through its part "trans" only when no
#     whole code matched).


_GENDER_WORDS = {"woman": "f", "women": "f", "girl": "f", "female": "f", "man": "m", "men": "m", "boy": "m", "male": "m"}


def _norm(s: str) -> str:
    return re.sub(r"[\s_\-]+", "", s.strip().lower())


def _labels(text: str, code: str) -> tuple[set[str], list[str]]:
    """(whole labels, code parts) of one answer: its text and code (normalised), and the code's parts."""
    whole = {_norm(text), _norm(code)} - {""}
    for w, g in _GENDER_WORDS.items():
        if _norm(code) == w or _norm(text) == w:
            whole.add(g)
    parts = [_norm(p) for p in re.split(r"[-_]", code) if _norm(p)]
    return whole, parts


def stereotyped_answers(item: BBQItem) -> list[int]:
    """Indices of the non-unknown answers that belong to the stereotyped group (see the rules above)."""
    groups = {_norm(g) for g in item.stereotyped_groups} | {
        _GENDER_WORDS[_norm(g)] for g in item.stereotyped_groups if _norm(g) in _GENDER_WORDS}
    people = [i for i in range(3) if i != item.unknown]
    labels = {i: _labels(*item.info[i]) for i in people}
    hit = [i for i in people if labels[i][0] & groups]
    if hit:
        return hit
    # no whole label matched: an intersectional code matches when all its parts are stereotyped groups,
    # or a group matches one part of a multi-part code ("trans" in "trans_F")
    hit = [i for i in people if len(labels[i][1]) > 1 and set(labels[i][1]) <= groups]
    if hit:
        return hit
    return [i for i in people if len(labels[i][1]) > 1 and set(labels[i][1]) & groups]


def target_index(item: BBQItem) -> int | None:
    """The biased answer's index: the stereotyped group's answer in negative questions, the other
    person's in non-negative ones; None when the stereotyped group matches no answer or both."""
    st = stereotyped_answers(item)
    if len(st) != 1:
        return None
    if item.polarity == "neg":
        return st[0]
    return next(i for i in range(3) if i != item.unknown and i != st[0])


def item_arrays(items: list[BBQItem]) -> dict[str, np.ndarray]:
    """(n,) arrays: label, target (-1 = none), unknown, ambig (bool), neg (bool), category (object),
    question_index (object)."""
    return {
        "label": np.array([it.label for it in items], np.int64),
        "target": np.array([t if (t := target_index(it)) is not None else -1 for it in items], np.int64),
        "unknown": np.array([it.unknown for it in items], np.int64),
        "ambig": np.array([it.condition == "ambig" for it in items], bool),
        "neg": np.array([it.polarity == "neg" for it in items], bool),
        "category": np.array([it.category for it in items], object),
        "question_index": np.array([f"{it.category}/{it.question_index}" for it in items], object),
    }


# ---------------------------------------------------------------------------------------------
# sampling and splits


def stratified_sample(items: list[BBQItem], max_items: int | None, seed: int = 0) -> list[BBQItem]:
    """At most ``max_items`` per category, spread evenly over the 4 (condition, polarity) cells
    (sampled without replacement, seeded); the original order is kept."""
    if not max_items:
        return list(items)
    if max_items < 1:
        raise UserError(f"--bbq-max-items {max_items}: must be >= 1")
    rng = np.random.default_rng(seed)
    keep: set[int] = set()
    cats = dict.fromkeys(it.category for it in items)
    for c in cats:
        cells: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            if it.category == c:
                cells.setdefault((it.condition, it.polarity), []).append(i)
        keys = sorted(cells)
        quota = {k: max_items // len(keys) + (j < max_items % len(keys)) for j, k in enumerate(keys)}
        spare = 0
        for k in sorted(keys, key=lambda k: len(cells[k])):  # small cells first: their leftover goes on
            q = quota[k] + spare
            take = min(q, len(cells[k]))
            spare = q - take
            keep.update(rng.choice(cells[k], take, replace=False).tolist())
    return [it for i, it in enumerate(items) if i in keep]


def split_by_question_index(items: list[BBQItem], test_share: float = 0.5, seed: int = 0
                            ) -> tuple[list[BBQItem], list[BBQItem]]:
    """(train, test) with whole templates (category, question_index) on one side, so test templates
    are unseen in training."""
    templates = sorted({(it.category, it.question_index) for it in items})
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(templates))
    n_test = max(1, int(round(test_share * len(templates)))) if len(templates) > 1 else 0
    test_t = {templates[i] for i in order[:n_test]}
    train = [it for it in items if (it.category, it.question_index) not in test_t]
    test = [it for it in items if (it.category, it.question_index) in test_t]
    return train, test


# ---------------------------------------------------------------------------------------------
# scoring items with a model (cloze and lettered)


def option_text(answer: str) -> str:
    """An answer as the cloze slot names it: without a leading article or trailing period
    ("The grandfather" -> "grandfather", "Can't be determined" unchanged)."""
    a = answer.strip().rstrip(".").strip()
    first, _, rest = a.partition(" ")
    return rest.strip() if first.lower() in ARTICLES and rest.strip() else a

