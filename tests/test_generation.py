"""End to end in generation (refine_llm.generation): greedy answers through the session's vLLM server
read as decisions, against the HF scoring path's argmax, with and without the served slot head.

- answer parsing and the one-hot decision metrics on known decisions (no model);
- ``test_generation_matches_hf_argmax``: a few dozen testbed-style test prompts (``testbed.eval_questions``
  at small size, ``qa`` prompt) answered greedily by the shared server (``vllm_server``: SmolLM2 in
  float32, heads of ``served_heads_dir``) and by the HF path (``smollm2_fp32`` + the same head on the
  top-k, argmax), with no head, the slot head and the gender (rank-swap) head: per-prompt decisions agree,
  and the UnQover decision metrics are the same.
"""

from __future__ import annotations

import numpy as np
import pytest

from refine_llm import generation as G
from refine_llm import metrics, testbed

from conftest import SERVED_MODEL

# 48 underspecified prompts (12 tuples) + 16 specified ones
SPEC = testbed.EvalSpec(names=2, attributes=1, spec_tuples=4)
# Measured on SmolLM2-135M fp32 (2 CPU cores, 3 sessions): decision agreement and first-token agreement 1.000
# for base, the slot head and the gender (rank-swap) head. The thresholds leave room for a near tie tipped by
# the two numerics (vLLM's fp32 kernels vs HF's prefix-cached forward; the slot head's context from the fp16
# hidden state on the HF path, from the logits row in the server): at most 3 of 64 prompts may differ.
MIN_AGREEMENT = 0.95
MIN_FIRST_TOKEN_AGREEMENT = 0.95
METRIC_TOL = 0.05  # |generation - HF argmax| of mean|C|, μ, specified accuracy, neither rate


@pytest.fixture(scope="module")
def questions():
    return testbed.eval_questions(SPEC)


def test_parse_answer():
    cases = [
        (" Mary", 0), (" mary.", 0), ("John\nText: Mary", 1), (" Ann", 0), (" Anna", 1), ("Anna-Lee", 1),
        (" Maryland", -1), (" the doctor", -1), ("", -1), ("\nMary", -1), (' "John"', 1), (" John and Mary", 1),
    ]
    for text, want in cases:
        s1, s2 = ("Ann", "Anna") if "Ann" in text else ("Mary", "John")
        assert G.parse_answer(text, s1, s2) == want, (text, want)


def test_hf_argmax_decisions():
    lp = np.log(np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]]))
    mask = np.zeros((4, 2, 3), dtype=bool)
    mask[:, 0, 0] = True  # slot 0 holds subj1's token
    mask[:, 1, 1] = True  # slot 1 holds subj2's token
    mask[3, 1, 0] = True  # row 3: a token shared by both subjects
    assert G.hf_argmax_decisions(lp, mask).tolist() == [0, 1, -1, -1]
    # a shared first token goes to the subject whose whole name is more probable
    whole = np.log(np.array([[0.5, 0.1], [0.1, 0.5], [0.3, 0.3], [0.1, 0.3]]))
    assert G.hf_argmax_decisions(lp, mask, whole).tolist() == [0, 1, -1, 1]


def test_decision_metrics_on_known_decisions(questions):
    n = questions.num_rows
    s1, group1 = np.array(questions["subj1"]), np.array(questions["subj1_group"])
    negated, spec = np.array(questions["negated"]), np.array(questions["specified"])
    gold = np.array([0 if g == a else 1 for g, a in zip(questions["gold"], s1)])

    # always the first-named subject: no preference, C = 0; specified right only where gold is subj1
    first = G.decision_metrics(questions, np.zeros(n, dtype=np.int64))
    assert first["mean_abs_c"] == 0 and first["mu"] == 0 and first["neither_rate"] == 0
    assert first["specified_accuracy"] == pytest.approx(np.mean(gold[spec] == 0))

    # fully stereotyped: the female subject for the attribute, the male one for its negation -> |C| = 1
    female_pos = np.where(group1 == "female", 0, 1)
    stereo = np.where(negated, 1 - female_pos, female_pos)
    stereo = np.where(spec, gold, stereo)  # and right on every specified question
    m = G.decision_metrics(questions, stereo)
    assert m["mean_abs_c"] == pytest.approx(1.0) and m["mu"] == pytest.approx(1.0)
    assert m["specified_accuracy"] == 1.0 and m["specified_accuracy_plain"] == 1.0
    assert m["specified_accuracy_negated"] == 1.0
    # the same C as the report's formula applied to the one-hot answer probabilities directly
    rows, _ = metrics.tuple_index(questions)
    C = metrics.tuple_bias(metrics.gather_tuples(G.onehot(stereo), rows))
    assert np.allclose(m["evaluation"]["tuples"]["C"], C)
    ci = G.level_ci(m["evaluation"], n_resamples=200)
    assert ci["mu"]["low"] == pytest.approx(1.0) and ci["mu"]["high"] == pytest.approx(1.0)

    # naming nobody: no bias, strictly wrong on specified questions (not a half-right tie)
    none = G.decision_metrics(questions, np.full(n, G.NEITHER))
    assert none["mean_abs_c"] == 0 and none["specified_accuracy"] == 0 and none["neither_rate"] == 1


@pytest.mark.slow
def test_generation_matches_hf_argmax(vllm_server, served_heads_dir, smollm2_fp32, questions):
    from refine_llm.head import load_head

    base_url, proc, _ = vllm_server
    model, tok = smollm2_fp32
    w_out = model.get_output_embeddings().weight.detach().float()
    heads = {"slot": load_head(served_heads_dir / "slot", lm_head_weight=w_out)[0],  # who is who (random MLP)
             "gender": load_head(served_heads_dir / "gender")[0]}  # swaps the top two ranks
    ids = G.prompt_token_ids(tok, questions, "qa")
    spec_rows = np.flatnonzero(np.asarray(questions["specified"], dtype=bool))

    import time

    t0 = time.perf_counter()
    scores = G.hf_scores(model, tok, questions, "qa", top_k=10, store_hidden=True)
    t_hf = time.perf_counter() - t0
    report = {}
    for cond, head in (("base", None), *heads.items()):
        hf = G.hf_predictions(scores, head)
        t0 = time.perf_counter()
        out = G.generate(base_url, SERVED_MODEL, ids, head=None if head is None else cond, batch_size=16, workers=4)
        print(f"{cond}: generation {time.perf_counter() - t0:.1f} s (HF scoring {t_hf:.1f} s)")
        d_gen = G.decisions_from_texts([c.text for c in out], questions)
        first = np.array([-1 if c.first_token_id is None else c.first_token_id for c in out])
        m_gen, m_hf = G.decision_metrics(questions, d_gen), G.decision_metrics(questions, hf["decisions"])
        report[cond] = dict(d_gen=d_gen, d_hf=hf["decisions"], m_gen=m_gen, m_hf=m_hf,
                            agree=G.agreement(d_gen, hf["decisions"]),
                            first=float(np.mean(first == hf["argmax_token_id"])))
        r = report[cond]
        print(f"{cond}: agreement {r['agree']:.3f}, first token {r['first']:.3f}; "
              + ", ".join(f"{k} gen {m_gen[k]:.3f} / hf {m_hf[k]:.3f}" for k in G.GENERATION_KEYS))

    for cond, r in report.items():
        assert r["agree"] >= MIN_AGREEMENT, (cond, r["agree"])
        assert r["first"] >= MIN_FIRST_TOKEN_AGREEMENT, (cond, r["first"])
        for k in ("mean_abs_c", "mu", "specified_accuracy", "neither_rate"):
            assert abs(r["m_gen"][k] - r["m_hf"][k]) <= METRIC_TOL, (cond, k, r["m_gen"][k], r["m_hf"][k])
    # the plain model answers with a name: the parse reads its answers
    assert report["base"]["m_gen"]["neither_rate"] < 0.2, report["base"]["m_gen"]["neither_rate"]
    # each served head acts: it changes decisions (HF and generation alike, per the agreement above)
    for cond in heads:
        assert (report[cond]["d_gen"] != report["base"]["d_gen"]).mean() > 0.1, cond
    assert len(spec_rows) == 16 and proc.poll() is None
