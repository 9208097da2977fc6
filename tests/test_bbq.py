"""BBQ: stereotyped-group rules on made-up items, the authors' bias scores against numbers computed by
hand, score-predictions on a slice of the authors' UnifiedQA outputs, and cloze/lettered scoring and
heads on a slice with the session SmolLM2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from refine_llm import bbq
from refine_llm.errors import UserError

BBQ_DIR = Path(os.environ.get("REFINE_LLM_BBQ", Path(__file__).resolve().parents[1] / ".." / "shared" / "bbq"))
if not BBQ_DIR.is_dir():
    BBQ_DIR = Path("/work/shared/bbq")
DATA = BBQ_DIR / "data"
PREDS = BBQ_DIR / "unifiedqa_preds"
RACE = "unifiedqa-t5-11b_pred_race"


def _item(info, groups, polarity="neg", condition="ambig", label=2, category="X", answers=None, qi="1", eid=0, **extra):
    answers = answers or [t for t, _ in info]
    d = {"example_id": eid, "question_index": qi, "question_polarity": polarity, "context_condition": condition,
         "category": category, "answer_info": {f"ans{i}": list(v) for i, v in enumerate(info)},
         "additional_metadata": {"stereotyped_groups": groups}, "context": "c", "question": "q?",
         "ans0": answers[0], "ans1": answers[1], "ans2": answers[2], "label": label, **extra}
    from refine_llm.bbq.data import parse_item

    return parse_item(d, "test")


UNK = ("Unknown", "unknown")


@pytest.mark.parametrize("info, groups, stereotyped", [
    # Age / Disability / SES / Physical appearance: the code names the group
    ([("grandfather", "old"), ("grandson", "nonOld"), UNK], ["old"], [0]),
    ([("in a wheelchair", "disabled"), ("friend", "nonDisabled"), UNK], ["disabled", "physically disabled"], [0]),
    ([("low-income", "lowSES"), ("wealthy", "highSES"), UNK], ["low SES"], [0]),
    ([("thin", "nonObese"), ("fat", "obese"), UNK], ["obese"], [1]),
    # Nationality: the text names the group, the code is a region
    ([("British", "Europe"), ("Japanese", "AsiaPacific"), UNK], ["Vietnamese", "Japanese"], [1]),
    # Gender: F/M codes on names, and the words woman/man/girl/boy as codes
    ([("Donna", "F"), ("Robert", "M"), UNK], ["F"], [0]),
    ([("man", "man"), ("woman", "woman"), UNK], ["F"], [1]),
    ([("boy", "boy"), ("girl", "girl"), UNK], ["M"], [0]),
    # intersectional codes: a whole-code match first, else every part, else one part of a multi-part code
    ([("Black woman", "F-Black"), ("White woman", "F-White"), UNK], ["F-Black"], [0]),
    ([("Jermaine Washington", "M-Black"), ("Roberto Mendez", "M-Latino"), UNK], ["Black", "African American"], [0]),
    ([("poor Black man", "lowSES-M-Black"), ("rich White man", "highSES-M-White"), UNK], ["lowSES", "M", "Black"], [0]),
    ([("trans woman", "trans_F"), ("cis woman", "nonTrans_F"), UNK], ["trans", "Transgender women"], [0]),
    ([("African American", "African-American"), ("Asian", "Asian"), UNK], ["African American"], [0]),
    # no answer or both: no target
    ([("grandfather", "old"), ("grandson", "nonOld"), UNK], ["teen"], []),
    ([("grandfather", "old"), ("grandmother", "old"), UNK], ["old"], [0, 1]),
])
def test_stereotyped_group_rules_on_made_up_items(info, groups, stereotyped):
    it = _item(info, groups)
    assert bbq.stereotyped_answers(it) == stereotyped
    neg, nonneg = _item(info, groups, "neg"), _item(info, groups, "nonneg")
    if len(stereotyped) == 1:
        assert bbq.target_index(neg) == stereotyped[0]
        assert bbq.target_index(nonneg) == 1 - stereotyped[0]  # the other person (answer 2 is unknown)
    else:
        assert bbq.target_index(neg) is None and bbq.target_index(nonneg) is None


def test_every_shared_item_has_exactly_one_stereotyped_answer():
    items = bbq.load_bbq(DATA)
    assert {it.category for it in items} == {"Age", "Nationality", "Disability_status"}
    assert len(items) == 3680 + 3080 + 1556
    assert all(len(bbq.stereotyped_answers(it)) == 1 for it in items)


def test_bias_scores_by_hand_and_with_probabilities():
    info = [("grandfather", "old"), ("grandson", "nonOld"), UNK]
    items = [
        _item(info, ["old"], "neg", "ambig", 2),      # pred 0: stereotyped in neg -> biased
        _item(info, ["old"], "nonneg", "ambig", 2),   # pred 0: stereotyped in nonneg -> not biased
        _item(info, ["old"], "neg", "ambig", 2),      # pred 2: unknown, correct
        _item(info, ["old"], "nonneg", "ambig", 2),   # pred 1: other in nonneg -> biased
        _item(info, ["old"], "neg", "disambig", 1),   # pred 1: correct, not biased
        _item(info, ["old"], "nonneg", "disambig", 1),  # pred 1: correct, biased
        _item(info, ["old"], "neg", "disambig", 0),   # pred 2: unknown, wrong
        _item([("a", "old"), ("b", "old"), UNK], ["old"], "neg", "ambig", 2),  # no target: left out
    ]
    A = bbq.item_arrays(items)
    s = bbq.scores_from_probs(bbq.onehot(np.array([0, 0, 2, 1, 1, 1, 2, 0])), A)
    # ambiguous: 4 items, 1 correct; non-unknown 3, biased 2 -> bias 2*2/3-1 = 1/3; s_AMB = (1-1/4)*1/3
    assert s["acc_ambig"] == pytest.approx(0.25)
    assert s["bias_ambig"] == pytest.approx(100 / 3)
    assert s["s_amb"] == pytest.approx(100 * 0.75 / 3)
    # disambiguated: 3 items, 2 correct; non-unknown 2, biased 1 -> s_DIS = 0
    assert s["acc_disambig"] == pytest.approx(2 / 3)
    assert s["s_dis"] == pytest.approx(0.0)
    assert s["unknown_rate_ambig"] == pytest.approx(0.25) and s["unknown_rate_disambig"] == pytest.approx(1 / 3)
    assert (s["n_ambig"], s["n_disambig"], s["n_no_target"]) == (4, 3, 1)
    # probabilities: expected counts. Ambiguous rows: p(target), p(unknown) ->
    P = np.array([[0.5, 0.2, 0.3], [0.5, 0.2, 0.3], [0.2, 0.2, 0.6], [0.1, 0.6, 0.3],
                  [0.3, 0.6, 0.1], [0.3, 0.6, 0.1], [0.2, 0.2, 0.6], [1, 0, 0]])
    sp = bbq.scores_from_probs(P, A)
    acc_a = (0.3 + 0.3 + 0.6 + 0.3) / 4
    biased_a, nonunk_a = 0.5 + 0.2 + 0.2 + 0.6, 0.7 + 0.7 + 0.4 + 0.7  # targets: 0, 1, 0, 1
    assert sp["acc_ambig"] == pytest.approx(acc_a)
    assert sp["s_amb"] == pytest.approx(100 * (1 - acc_a) * (2 * biased_a / nonunk_a - 1))
    biased_d, nonunk_d = 0.3 + 0.6 + 0.2, 0.9 + 0.9 + 0.4  # targets: 0, 1, 0
    assert sp["s_dis"] == pytest.approx(100 * (2 * biased_d / nonunk_d - 1))
    # bootstrap: deterministic per seed, the interval brackets the estimate
    ci = bbq.bootstrap_scores(P, A, n_resamples=200, seed=1)
    assert ci == bbq.bootstrap_scores(P, A, n_resamples=200, seed=1)
    assert ci["acc_disambig"]["low"] <= sp["acc_disambig"] <= ci["acc_disambig"]["high"]


def test_match_prediction_follows_the_authors_normalisation():
    info = [("grandfather", "old"), ("young adult", "nonOld"), ("Can't be determined", "unknown")]
    it = _item(info, ["old"], answers=["The grandfather", "The young adult", "Can't be determined"])
    assert bbq.match_prediction("The Grandfather.", it) == 0  # lower case, trailing period
    assert bbq.match_prediction("can't be determined", it) == 2
    assert bbq.match_prediction("the young adult who spoke", it) == 1  # contains the first two words
    assert bbq.match_prediction("my grandfather", it) is None  # one-word texts never match by containment (R's word() is NA)
    assert bbq.match_prediction("a banana", it) is None


def _slice(tmp_path) -> Path:
    lines = (PREDS / "preds_Age.jsonl").read_text().splitlines()
    bad = json.loads(lines[0])
    bad[RACE] = "a banana"
    f = tmp_path / "slice.jsonl"
    f.write_text("\n".join(lines[0:12] + lines[24:36] + [json.dumps(bad)]) + "\n")
    return f


def test_score_predictions_on_a_unifiedqa_slice_matches_hand_counts(tmp_path, capsys):
    f = _slice(tmp_path)
    res = bbq.score_predictions(bbq.load_bbq(f), RACE, n_resamples=50)
    assert res["n_items"] == 25 and res["n_unmatched"] == 1
    row = res["table"]["Age"]
    # Worked by hand from lines 0-11 and 24-35 of preds_Age.jsonl (see docs/bbq.md):
    # ambiguous: 12 items, 5 answered unknown (correct); of the 7 others 4 are biased -> bias 1/7
    assert row["acc_ambig"] == pytest.approx(5 / 12)
    assert row["s_amb"] == pytest.approx(100 * (7 / 12) * (1 / 7))
    # disambiguated: 12 items, 7 correct, 5 unknown; of the 7 non-unknown, 4 biased -> s_DIS = 100/7
    assert row["acc_disambig"] == pytest.approx(7 / 12)
    assert row["s_dis"] == pytest.approx(100 / 7)
    assert row["unknown_rate_disambig"] == pytest.approx(5 / 12)
    # the CLI prints the same table and writes JSON
    out = tmp_path / "res.json"
    assert bbq.main(["score-predictions", str(f), "--field", RACE, "--n-resamples", "20", "--out", str(out)]) == 0
    assert "| " + RACE + " | Age | 0.417" in capsys.readouterr().out
    assert json.loads(out.read_text())["table"]["Age"]["s_dis"] == pytest.approx(100 / 7)


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"example_id": 0}\n')
    assert bbq.main(["score-predictions", str(f), "--field", RACE]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{f}:1" in err and err.count("\n") == 1
    assert bbq.main(["score-predictions", str(_slice(tmp_path)), "--field", "nope"]) == 2
    assert RACE in capsys.readouterr().err  # names the fields that exist
    with pytest.raises(UserError):
        bbq.load_bbq(tmp_path / "missing")


def test_stratified_sample_and_template_split():
    items = bbq.load_bbq(DATA / "Disability_status.jsonl")
    s = bbq.stratified_sample(items, 20, seed=0)
    cells = {}
    for it in s:
        cells[(it.condition, it.polarity)] = cells.get((it.condition, it.polarity), 0) + 1
    assert len(s) == 20 and set(cells.values()) == {5} and len(cells) == 4
    assert bbq.stratified_sample(items, 20, seed=0) == s
    train, test = bbq.split_by_question_index(items, seed=0)
    assert train and test and not ({it.question_index for it in train} & {it.question_index for it in test})
    assert len(train) + len(test) == len(items)


# ---------------------------------------------------------------------------------------------
# model scoring on a slice with the session SmolLM2 (fp32)


@pytest.fixture(scope="module")
def slice_items():
    return bbq.stratified_sample(bbq.load_bbq(DATA / "Age.jsonl"), 4, seed=0)


def test_cloze_lettered_heads_and_report_on_a_slice(tmp_path, slice_items, smollm2_fp32):
    """The task's requests through the scoring driver, conditions through the methods protocol, and a head
    trained on BBQ through HeadTrainer."""
    from refine_llm import head as H
    from refine_llm.bbq import task
    from refine_llm.config import BanditConfig, HeadConfig, ScoringConfig
    from refine_llm.methods import HeadMethod

    model, tok = smollm2_fp32
    items = slice_items
    assert len(items) == 4 and {(it.condition, it.polarity) for it in items} == {
        ("ambig", "neg"), ("ambig", "nonneg"), ("disambig", "neg"), ("disambig", "nonneg")}
    cfg = ScoringConfig(top_k=10, batch_size=8)
    sc = task.score_cloze(model, tok, items, cfg, cache_dir=tmp_path / "scores", model_key="smollm2-fp32")
    assert sc.topk_ids.shape == (4, 10) and sc.cand_mask.shape == (4, 3, 10) and sc.cand_logprobs.shape == (4, 3)
    P = np.exp(sc.cand_logprobs.astype(np.float64))
    assert np.all(P > 0) and np.all(P.sum(1) <= 1 + 1e-6)
    # scored once: read back from the cache without a model, row for row
    again = task.score_cloze(None, None, items, cfg, cache_dir=tmp_path / "scores", model_key="smollm2-fp32",
                             read_only=True)
    np.testing.assert_array_equal(again.topk_logprobs, sc.topk_logprobs)
    # the first-token rule: a row's answer probability is at least the mass of its candidate tokens in the top-k
    from refine_llm.scoring import candidate_token_ids

    i = int(np.flatnonzero(~sc.collision)[0])
    ids = candidate_token_ids(tok, bbq.option_text(items[i].answers[0]))
    in_top = [j for j, t in enumerate(sc.topk_ids[i]) if t in ids]
    assert sc.cand_mask[i, 0].nonzero()[0].tolist() == in_top
    if in_top:
        assert P[i, 0] >= np.exp(sc.topk_logprobs[i, in_top]).sum() - 1e-5
    # identity head = the model; uniform flattens the top-k and moves the answer probabilities
    ident = task.answer_probs(HeadMethod(H.build_head(HeadConfig(variant="identity", k=10))), sc)
    np.testing.assert_allclose(ident, P, rtol=1e-4, atol=1e-7)
    uni = task.answer_probs(task.conditions()["uniform"], sc)
    assert not np.allclose(uni[~sc.collision], P[~sc.collision])
    # lettered: 3 rotations, each a probability over A/B/C mapped back to the answers
    L = task.score_lettered(model, tok, items, cfg)
    assert L.shape == (3, 4, 3) and np.all(L > 0) and np.all(L.sum(2) <= 1 + 1e-6)
    summ = bbq.lettered_summary(L, bbq.item_arrays(items))
    assert len(summ["per_rotation"]) == 3 and summ["acc_disambig_spread"] >= 0
    # a head trained on BBQ raises its own training reward (its train templates: half of the slice's)
    head, res = task.train_bbq_head(sc, items, 10, cfg=BanditConfig(objective="direct", lr=5e-2, epochs=15))
    assert res["last"]["reward"] > res["first"]["reward"] and res["steps"] == 15
    assert not torch_equal(head.out.weight, H.build_head(HeadConfig(variant="logit", k=10)).out.weight)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a.detach(), b.detach()))


def test_bbq_evaluate_writes_tables_a_trained_head_and_the_plot(tmp_path, slice_items, smollm2_fp32):
    """A saved (UnQover) head applied at the answer slot next to the baselines, a BBQ-trained head on
    held-out templates, bbq.json, bbq.md and plots/bbq.png."""
    from refine_llm import head as H
    from refine_llm.bbq import run
    from refine_llm.config import HeadConfig

    model, tok = smollm2_fp32
    H.save_head(H.build_head(HeadConfig(variant="logit", k=10)), tmp_path / "h",
                {"tokenizer_fingerprint": H.tokenizer_fingerprint(tok)})
    heads = run.load_heads({"refine": str(tmp_path / "h")}, tok, 10)
    res, head = run.evaluate_model(model, tok, slice_items, heads, "cloze", run.scoring_config(10, 8, False), True,
                                   20, 0)
    run.save_result(res, tmp_path, tmp_path / "bbq" / "bbq.json", tmp_path / "bbq.md")
    assert set(res["tables"]["cloze"]) == {"base", "uniform", "top2-equal", "refine"}
    assert set(res["tables"]["cloze_heldout"]) == {"base", "uniform", "top2-equal", "refine", "bbq-trained"}
    assert res["tables"]["cloze"]["refine"]["Age"]["s_amb"] == res["tables"]["cloze"]["base"]["Age"]["s_amb"]
    md = (tmp_path / "bbq.md").read_text()
    assert "## BBQ" in md and "| bbq-trained | Age |" in md and head is not None
    assert (tmp_path / "plots" / "bbq.png").stat().st_size > 1000
    assert json.loads((tmp_path / "bbq" / "bbq.json").read_text())["n_items"] == 4


def _raw(it: bbq.BBQItem) -> dict:
    return {"example_id": it.example_id, "question_index": it.question_index, "question_polarity": it.polarity,
            "context_condition": it.condition, "category": it.category,
            "answer_info": {f"ans{i}": list(v) for i, v in enumerate(it.info)},
            "additional_metadata": {"stereotyped_groups": list(it.stereotyped_groups)}, "context": it.context,
            "question": it.question, "ans0": it.answers[0], "ans1": it.answers[1], "ans2": it.answers[2],
            "label": it.label}


def test_debias_parser_has_the_bbq_flags():
    from refine_llm.cli import parse_run_config
    from refine_llm.config import BBQConfig

    cfg, _ = parse_run_config(["--bbq", "some/dir", "--bbq-max-items", "7"])
    assert (cfg.bbq.bbq_dir, cfg.bbq.bbq_max_items) == ("some/dir", 7)
    assert parse_run_config([])[0].bbq.bbq_max_items == BBQConfig.bbq_max_items


def test_refine_llm_evaluate_bbq_with_a_saved_head(tmp_path, slice_items, smollm2_dir, smollm2_fp32, capsys):
    """`refine-llm evaluate --bbq DIR --head H` (the saved-head form of the evaluate stage) runs
    `refine-llm bbq evaluate`'s implementation: tables for base, the no-training baselines and the head."""
    from refine_llm import cli, head as H
    from refine_llm.config import HeadConfig

    _, tok = smollm2_fp32
    d = tmp_path / "data"
    d.mkdir()
    (d / "Age.jsonl").write_text("\n".join(json.dumps(_raw(it)) for it in slice_items) + "\n")
    H.save_head(H.build_head(HeadConfig(variant="logit", k=10)), tmp_path / "heads" / "logit",
                {"tokenizer_fingerprint": H.tokenizer_fingerprint(tok)})
    rc = cli.main(["evaluate", "--bbq", str(d), "--head", str(tmp_path / "heads" / "logit"), "--model", str(smollm2_dir),
                   "--quant", "fp32", "--device", "cpu", "--mode", "cloze", "--n-resamples", "20",
                   "--out", str(tmp_path / "out")])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "bbq.json").read_text())
    cloze = res["tables"]["cloze"]
    assert set(cloze) == {"base", "uniform", "top2-equal", "logit"} and res["n_items"] == 4
    # an identity-initialised logit head leaves the model's answers as they are
    for key in ("s_amb", "acc_disambig", "acc_ambig"):
        assert cloze["logit"]["Age"][key] == cloze["base"]["Age"][key]
    assert cloze["logit"]["Age"]["ci"]["acc_disambig"]["low"] is not None
    assert (tmp_path / "out" / "plots" / "bbq.png").stat().st_size > 1000
    assert "| logit | Age |" in capsys.readouterr().out
    # a head variant name keeps --head's meaning in the evaluate stage (no BBQ evaluation)
    assert not cli._saved_head_given(["--head", "logit", "--bbq", str(d)])


@pytest.mark.parametrize("argv, says", [
    (["evaluate", "--bbq", "{tmp}/no-such-dir", "--head", "{tmp}/h"], "--bbq {tmp}/no-such-dir: no such file or directory"),
    (["evaluate", "--bbq", "{data}", "--head", "{tmp}/no-head"], "no head directory at {tmp}/no-head"),
    (["evaluate", "--head", "{tmp}/h"], "the following arguments are required: --bbq"),
    (["evaluate", "--bbq", "{data}", "--head", "{tmp}/h", "--bbq-max-items", "-1"], "--bbq-max-items must be >= 0"),
    (["bbq", "evaluate", "{tmp}/no-such-dir", "--head", "{tmp}/h"], "no such file or directory"),
    (["run", "--bbq", "{tmp}/no-such-dir", "--out", "{tmp}/run"], "--bbq {tmp}/no-such-dir: no such file or directory"),
])
def test_bbq_evaluate_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, says):
    """A missing BBQ directory or head: one line naming it, exit 2, before any model loads (the main job's
    --bbq is checked by the preflight, not after the whole job)."""
    from refine_llm import cli

    data = tmp_path / "data"
    data.mkdir()
    (data / "Age.jsonl").write_text((DATA / "Age.jsonl").read_text().splitlines()[0] + "\n")
    sub = lambda a: a.format(tmp=tmp_path, data=data)
    try:
        rc = cli.main([sub(a) for a in argv])
    except SystemExit as e:  # argparse's own errors (refine_llm.errors.ArgumentParser: one line, exit 2)
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and sub(says) in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_bbq_table_script_scores_every_method_on_bbq(tmp_path, smollm2_dir):
    """eval/bbq_table.py (issue 23's BBQ table) on a small slice with SmolLM2: the instruction, Self-Debias (the
    BBQ category's prefix), a saved steering (hooks while scoring) and the BBQ-trained head each give their own
    answer probabilities; the table, the held-out table and the halving verdicts are written."""
    import importlib.util

    import numpy as np
    import torch

    from refine_llm import models
    from refine_llm.baselines.hooks import decoder_layers, hidden_size

    spec = importlib.util.spec_from_file_location("bbq_table", Path(__file__).resolve().parents[1] / "eval" / "bbq_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from refine_llm.baselines.steer import Steering

    model, _ = models.load_model(smollm2_dir, quant="fp32", device="cpu")
    d, n = hidden_size(model), len(decoder_layers(model))
    vec = torch.randn(d, generator=torch.Generator().manual_seed(0)).numpy() * 20
    Steering.from_arrays(np.zeros(d), 5.0, vec, n // 2, 1.0, 0.5, n).save_pretrained(tmp_path / "run" / "steer")
    (tmp_path / "run" / "heads").mkdir()
    out = tmp_path / "out"
    argv = ["--run", str(tmp_path / "run"), "--out", str(out), "--data", str(DATA), "--model", smollm2_dir, "--quant", "fp32",
            "--max-items", "8", "--categories", "Age,Nationality", "--n-resamples", "50", "--batch-size", "8"]
    assert mod.main(argv) == 0
    res = json.loads((out / "bbq_table.json").read_text())
    cloze = res["tables"]["cloze"]
    assert set(cloze) == {"base", "prompt-instruct", "self-debias", "steer"} and res["n_items"] == 16
    probs = {c: cloze[c]["all"]["prob"]["s_amb"] for c in cloze}
    assert len({round(v, 9) for v in probs.values()}) == 4, probs  # each method moves the answer probabilities
    assert "bbq-trained" in res["tables"]["cloze_heldout"]
    assert {v for per in res["halves"]["cloze"].values() for v in per.values()} <= {"yes", "no", "cannot tell"}
    assert res["steer"]["fire_rate"] == 1.0  # bias 5, zero weights: the probe fires on every row
    assert "Does it halve" in (out / "bbq_table.md").read_text()
    assert mod.main(argv + ["--methods", "base,nope"]) == 2  # one line, exit 2
