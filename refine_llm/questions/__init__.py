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

Modules: ``lists`` (the word lists: read and checked) and ``build`` (tuples, splits, sampling, the dataset
and its files). CLI: ``python -m refine_llm.questions --category all --seed 0 --max-tuples 200 --out DIR``
(flags from ``config.QuestionsArgs``).
"""

from __future__ import annotations

from refine_llm.questions.build import (COLUMNS, SPLITS, SplitSpace, build_questions, dataset_features, load_questions,
                                        main, question_rows, rows_for_tuple, save_questions, split_spaces,
                                        tuple_counts)
from refine_llm.questions.lists import (WORDLISTS_DIR, Attribute, Template, WordLists, category_subjects,
                                        category_vocabulary, load_wordlists)

__all__ = ["Attribute", "Template", "WordLists", "WORDLISTS_DIR", "COLUMNS", "SPLITS", "build_questions",
           "load_wordlists", "category_vocabulary", "category_subjects", "question_rows", "tuple_counts", "split_spaces", "SplitSpace", "rows_for_tuple",
           "dataset_features", "save_questions", "load_questions", "main"]
