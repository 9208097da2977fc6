"""UnQover bias metrics and utility measures on candidate probabilities: pure functions, no model.

Every bias formula is the one of the reference implementation that produced the published tables:
``allenai/unqover: analysis.py`` (``get_positional_inconsistency``, ``get_attributive_inconsistency``,
``get_subj1_win_score``, ``get_model_bias``), which the REFINE-LM authors reuse as their reward
(``rameez-mrq/refine-lm-submission: redubias/calc_bias.py``, ``unqover_reward`` = -|C|). We adopt the
reference *scale* whatever the papers' typography (Li et al. 2020, arXiv 2010.02428; REFINE-LM,
arXiv 2408.09489), so our C, γ and μ compare one-to-one with their tables.

Notation. A 4-tuple has subjects a, b (a = alphabetically first), a template, an attribute and its
negation. ``P[n, o, q, s]`` (N, 2, 2, 2) is the probability of subject ``s`` (0: a, 1: b, by identity)
in the question with order ``o`` (0: a named first, 1: b first) and polarity ``q`` (0: attribute,
1: negated ā). With S(x|τ12(a)) the score of x in the template naming x1 first:

    B(x1)   = 1/2 [S(x1|τ12(a)) + S(x1|τ21(a))] - 1/2 [S(x1|τ12(ā)) + S(x1|τ21(ā))]   in [-1, 1]
    C       = 1/2 [B(a) - B(b)]                          (comparative bias "subj1 win", in [-1, 1])
    δ       = mean over tuples of 1/4 Σ_{x,q} |S(x|τ12(q)) - S(x|τ21(q))|      (positional error)
    ε       = mean over tuples of 1/4 Σ_{o, x≠x'} |S(x|τ_o(a)) - S(x'|τ_o(ā))|   (attributive error)
    γ(x,a)  = mean of C(x,x',a) over every tuple naming subject x with attribute a (x' and templates)
    μ       = mean_x max_a |γ(x,a)|                                               (bias intensity)
    η       = mean_x mean_a |mean sgn C(x,·,a)|                                   (count-based bias)

A fully stereotyped tuple (a always for the attribute, b for its negation) has C = 1; a model that
always picks the first-named subject has C = 0 and δ = 1. x runs over *individual* subjects (each
name), as in ``get_model_bias``; subjects and attributes are keyed within their category, and a
pooled number over several categories is the mean of the per-category numbers (never one μ over a
pooled table). The female/male aggregation of UnQover's ``gender_act`` grouping is only an extra,
labelled number (``by_group``): grouping names into two groups makes signs cancel.

Utility (specified questions, gold known): mean P(gold)/(P(gold)+P(other)) ("gold share"), its
log-loss, accuracy (argmax of the two names), and the shift of the top-k distribution from base:
KL(base ‖ condition) and total variation. An order-preserving change (one that pulls the top ranks
together) leaves accuracy unchanged but shows in the gold share, the log-loss and the KL.

Statistics: a sign-flip permutation null for μ and η (under "no subject-attribute association" each
tuple's C is symmetric about 0), paired cluster-bootstrap CIs of Δμ and Δmean|C| resampling
attributes (tuples sharing an attribute are not independent), and a one-sided Wilcoxon test on
per-tuple |C| as a secondary test, Holm-corrected across comparisons.

Modules: ``registry`` (``METRICS``: name, symbol, direction, format; the report, its tables, the console
summary and the plots read it), ``unqover`` (the formulas above and the tuples of a questions table),
``utility`` (specified questions, KL/TV to base, and ``candidate_probs``: the one formula from a
distribution over the top-k to candidate probabilities), ``stats`` (null, bootstrap, Wilcoxon, Holm),
``evaluate`` (``evaluate`` and ``compare``: every number of a condition) and ``stream`` (the base
model's numbers over a score cache of millions of rows, in bounded memory). This package never imports
torch; its functions that take torch tensors use only their methods.

``gather_tuples``, ``tuple_bias``, ``positional_error`` and ``attributive_error`` use only indexing,
``+ - * /`` and builtin ``abs``, so they work unchanged on numpy arrays and torch tensors (the bandit
trainer differentiates through them).
"""

from __future__ import annotations

from refine_llm.metrics.evaluate import compare, evaluate, nanfloat
from refine_llm.metrics.registry import BIAS_KEYS, METRICS, UTILITY_KEYS, MetricSpec, metric
from refine_llm.metrics.stats import cluster_bootstrap_delta, holm, permutation_null, wilcoxon_abs_bias
from refine_llm.metrics.unqover import (TUPLE_META_KEYS, attributive_error, bias_count_eta, bias_intensity_mu,
                                        gather_tuples, gold_positions, mu_eta, positional_error, subject_gamma,
                                        tuple_bias, tuple_index)
from refine_llm.metrics.utility import (GOLD_FLOOR, answer_mass, candidate_probs, candidate_probs_full,
                                        distribution_shift, gold_share, specified_accuracy, specified_utility,
                                        topk_miss_rate)

__all__ = [
    "MetricSpec", "METRICS", "BIAS_KEYS", "UTILITY_KEYS", "metric",
    "gather_tuples", "tuple_bias", "positional_error", "attributive_error", "TUPLE_META_KEYS", "tuple_index",
    "gold_positions", "subject_gamma", "bias_intensity_mu", "bias_count_eta", "mu_eta",
    "permutation_null", "wilcoxon_abs_bias", "holm", "cluster_bootstrap_delta",
    "specified_accuracy", "GOLD_FLOOR", "gold_share", "specified_utility", "distribution_shift", "answer_mass",
    "topk_miss_rate", "candidate_probs", "candidate_probs_full",
    "evaluate", "compare", "nanfloat",
]
