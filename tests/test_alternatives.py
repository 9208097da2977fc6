"""The methods of issue 23 on SmolLM2-135M (fp32): prompt-instruct, Self-Debias and activation steering.

Each method changes what it should and leaves the base untouched when switched off:
- prompt variants: the shipped instruct files are the base prompts plus the instruction, prefixes land
  before the question's text; the instruct prompt's scores differ from the base prompt's and the base
  cache is not touched;
- Self-Debias (pure formula): no prefix effect (Δ >= 0) returns the base renormalised; a token a
  prefix makes likelier is down-weighted by exp(λΔ) (floored at ε);
- steering: strength 0 or a probe that never fires is bit-identical to the base; a firing probe moves
  the logits, only on the rows it fires on, the same on the prefix-cached and whole-prompt paths and in
  generate; the captured activations are the model's hidden states; save/load round-trips and refuses
  another tokenizer / hidden size / damaged weights; the train-split -> validation pipeline runs.
- passes.score_at_ids with the base prompt reproduces the cached top-k log-probs bit for bit.

Short prompts and 1 tuple (+ its 4 specified questions) per split: one 8-row forward per pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from refine_llm import method_runs as R
from refine_llm import passes, prompt_variants as V, prompts, scoring
from refine_llm.config import QuestionsConfig, ScoringConfig
from refine_llm.errors import UserError
from refine_llm.methods.self_debias import self_debias
from refine_llm.baselines.steer import (SteerConfig, Steering, balanced_accuracy, bias_labels, candidate_layers,
                                      choose_strength, mean_difference, steering_vector, train_probe)

ROOT = Path(__file__).resolve().parents[1]
SHORT = "Answer with a name from the text.\nText: Anna met Tom, who plays chess. Question: Who plays chess? Answer: Tom\n" \
        "Text: [context] Question: [question] Answer:"
CFG = ScoringConfig(prompt="qa", batch_size=8, top_k=10)  # one forward per 8-row split (1 tuple + 4 specified)


@pytest.fixture(scope="module")
def short_prompt(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompt") / "short.txt"
    path.write_text(SHORT)
    return prompts.load_prompt(path)


@pytest.fixture(scope="module")
def splits():
    from refine_llm.questions import question_rows

    rows = question_rows(QuestionsConfig(category="gender", max_tuples=1, subjects_per_split=2, attributes_per_split=2))
    return {s: [r for r in rows if r["split"] == s] for s in ("train", "validation")}


@pytest.fixture(scope="module")
def base(smollm2_fp32, short_prompt, splits, tmp_path_factory):
    model, tok = smollm2_fp32
    cache = tmp_path_factory.mktemp("scores")
    return {s: scoring.score(model, tok, q, short_prompt, CFG, cache_dir=cache, model_key="smol", progress=False)
            for s, q in splits.items()} | {"cache": cache}


def _cols(ds):
    return {c: np.asarray(ds[c], dtype=object if c == "question_id" else None)
            for c in ("question_id", "topk_ids", "topk_logprobs", "cand_logprobs", "nonfinite")}


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(_cols(a).values(), _cols(b).values()))


# ----------------------------------------------------------------------------- prompt variants (no model)


@pytest.mark.parametrize("name", ["chat", "qa", "paper"])
def test_instruct_files_are_base_plus_instruction(name):
    t, text = V.instruct_prompt(name)
    base = prompts.load_prompt(name)
    assert text == V.INSTRUCTION and t.text == V.add_instruction(base).text
    assert t.fingerprint != base.fingerprint and t.kind == base.kind
    if name == "chat":
        assert t.messages[0][1].endswith(V.INSTRUCTION) and t.messages[1:] == base.messages[1:]
    else:
        assert t.text.splitlines()[0] == V.INSTRUCTION


def test_instruct_for_user_files(tmp_path):
    user = tmp_path / "mine.txt"
    user.write_text("Q: [context] [question] A:")
    t, text = V.instruct_prompt(user)
    assert text == V.INSTRUCTION and t.text == f"{V.INSTRUCTION}\nQ: [context] [question] A:"
    own = tmp_path / "own.txt"
    own.write_text("Be fair to everyone.\nQ: [context] [question] A:")
    assert V.instruct_prompt(user, own)[1] == "Be fair to everyone."
    with pytest.raises(UserError, match="same kind"):
        V.instruct_prompt(user, ROOT / "prompts" / "chat_instruct.txt")
    with pytest.raises(UserError, match="adds nothing"):
        V.instruct_prompt(user, user)
    no_system = prompts.parse_template("### user\n[context] [question]", name="ns")
    assert V.add_instruction(no_system).messages[0] == ("system", V.INSTRUCTION)


def test_self_debias_prefix_placement():
    pre = "The following text discriminates against people because of their gender:"
    assert V.prefixes_for("gender") == [pre] and set(V.load_prefixes()) == {
        "gender", "nationality", "ethnicity", "religion", "age", "disability"}  # BBQ's Age, Disability_status
    qa = V.with_prefix(prompts.load_prompt("qa"), pre)
    assert qa.text.endswith(f"{pre}\nText: [context] Question: [question] Answer:")
    assert qa.prefix().endswith(f"{pre}\nText: ") and qa.fingerprint != prompts.load_prompt("qa").fingerprint
    chat = V.with_prefix(prompts.load_prompt("chat"), pre)
    assert chat.messages[-1] == ("user", f"{pre}\nText: [context]\nQuestion: [question]")
    assert chat.messages[:-1] == prompts.load_prompt("chat").messages[:-1]


def test_prefix_file_errors(tmp_path):
    f = tmp_path / "p.txt"
    for text, match in [("just a line\n", "before the first"), ("### gender\n", "no prefix for gender"),
                        ("### gender\na\n### gender\nb\n", "appears twice")]:
        f.write_text(text)
        with pytest.raises(UserError, match=match):
            V.load_prefixes(f)
    with pytest.raises(UserError, match="no such file"):
        V.load_prefixes(tmp_path / "missing.txt")
    f.write_text("# comment\n### gender\nA biased text:\n")
    with pytest.raises(UserError, match="no Self-Debias prefixes for category religion"):
        V.prefixes_for("religion", f)


# ----------------------------------------------------------------------------- Self-Debias formula


def _lsm(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_self_debias_no_prefix_effect_is_base():
    rng = np.random.default_rng(0)
    base = np.log(rng.dirichlet(np.ones(12), size=5))[:, :6]  # full-vocab log-probs of a top-6
    biased = base[:, None, :] - rng.uniform(0, 2, size=(5, 3, 6))  # every prefix makes every slot less likely
    np.testing.assert_allclose(self_debias(base, biased), _lsm(base), atol=1e-6)
    np.testing.assert_allclose(self_debias(base, base[:, None]), _lsm(base), atol=1e-6)  # Δ = 0


def test_self_debias_down_weights_what_a_prefix_raises():
    p = np.array([[0.5, 0.3, 0.1]])
    pb1 = np.array([[0.4, 0.36, 0.1]])  # raises slot 1 by 0.06
    pb2 = np.array([[0.5, 0.32, 0.12]])  # raises slot 1 by 0.02 and slot 2 by 0.02
    out = np.exp(self_debias(np.log(p), np.log(np.stack([pb1, pb2], 1)), decay=50, epsilon=0))
    alpha = np.array([1.0, np.exp(-50 * 0.06), np.exp(-50 * 0.02)])  # max over prefixes
    np.testing.assert_allclose(out, (p * alpha) / (p * alpha).sum(), atol=1e-6)
    assert out[0, 1] < p[0, 1] / p.sum() and out[0, 0] > p[0, 0] / p.sum()
    floored = np.exp(self_debias(np.log(p), np.log(pb1[:, None]), decay=1000, epsilon=0.01))
    a = np.array([1.0, 0.01, 1.0])
    np.testing.assert_allclose(floored, (p * a) / (p * a).sum(), atol=1e-6)
    with pytest.raises(ValueError, match="biased"):
        self_debias(np.log(p), np.log(pb1))


# ----------------------------------------------------------------------------- steering, pure parts


def test_labels_probe_vector_strength():
    p = np.array([[0.9, 0.1], [0.5, 0.5], [0.6, 0.4], [0.99, 0.01], [0.45, 0.55], [0.7, 0.3], [0.95, 0.05]])
    spec = np.array([False] * 6 + [True])
    lab = bias_labels(spec, p, quantile=1 / 3)
    # commitments 0.8, 0, 0.2, 0.98, 0.1, 0.4: the top third biased, the bottom third unbiased, the rest unused
    assert lab["y"].tolist() == [1, 0, -1, 1, 0, -1, 0] and lab["group"].tolist() == [1, 0, -1, 1, 0, -1, -1]
    again = bias_labels(spec, p, thresholds=lab["thresholds"])
    assert again["y"].tolist() == lab["y"].tolist()
    with pytest.raises(UserError, match="equally committed"):
        bias_labels([False] * 4, np.full((4, 2), 0.5))

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16)) * 5 + 3
    y = (x[:, 2] - x[:, 5] > 0).astype(np.int8)
    w, b = train_probe(x, y, l2=1e-3)
    assert balanced_accuracy(y, x @ w + b > 0) > 0.97
    g = np.array([0, 1, -1, 0])
    xs = np.array([[1., 0], [0, 2], [9, 9], [3, 0]])
    np.testing.assert_allclose(mean_difference(xs, g), [2, -2])
    v, norms = steering_vector(xs, g)  # the DSV's direction at the rows' mean norm
    np.testing.assert_allclose(v, np.array([2, -2]) / np.sqrt(8) * np.linalg.norm(xs, axis=1).mean(), rtol=1e-6)
    assert norms["dsv_norm"] == pytest.approx(np.sqrt(8))
    assert candidate_layers(30) == [7, 9, 11, 13, 15, 17, 19, 21] and candidate_layers(4) == [1, 2, 3]

    table = [{"strength": 0.0, "mean_abs_c": 0.2, "kl_base": 0.0, "gold_share": 0.8},
             {"strength": 1.0, "mean_abs_c": 0.1, "kl_base": 0.01, "gold_share": 0.795},
             {"strength": 2.0, "mean_abs_c": 0.05, "kl_base": 0.05, "gold_share": 0.79}]
    assert choose_strength(table, max_kl=0.02, max_gold_drop=0.01) == 1.0
    assert choose_strength(table, max_kl=0.001, max_gold_drop=0.01) == 0.0


# ----------------------------------------------------------------------------- passes + instruct (model)


def test_score_at_ids_reproduces_base(smollm2_fp32, short_prompt, splits, base):
    model, tok = smollm2_fp32
    arr = R.score_arrays(base["validation"])
    lp = passes.score_at_ids(model, tok, splits["validation"], short_prompt, arr["topk_ids"], CFG)
    assert np.array_equal(lp, arr["topk_logprobs"])
    pt = R.plane_point(splits["validation"], arr["cand_mask"], arr["topk_logprobs"], lp)
    assert pt["kl_base"] == 0 and pt["n_tuples"] == 1 and pt["mean_abs_c"] is not None


def test_instruct_scores_differ_and_base_cache_untouched(smollm2_fp32, short_prompt, splits, base):
    model, tok = smollm2_fp32
    val = splits["validation"]
    files = {p: p.read_bytes() for p in base["cache"].rglob("shard-*.arrow")}
    variant = V.add_instruction(short_prompt)
    inst = scoring.score(model, tok, val, variant, CFG, cache_dir=base["cache"], model_key="smol", progress=False)
    assert not np.array_equal(_cols(inst)["topk_logprobs"], _cols(base["validation"])["topk_logprobs"])
    lp, template, text = R.instruct_logprobs(model, tok, val, str(short_prompt.source), base["validation"], CFG)
    assert text == V.INSTRUCTION and template.fingerprint == variant.fingerprint
    assert not np.allclose(lp, R.score_arrays(base["validation"])["topk_logprobs"])
    again = scoring.score(model, tok, val, short_prompt, CFG, cache_dir=base["cache"], model_key="smol", progress=False)
    assert _same(again, base["validation"])
    assert all(p.read_bytes() == b for p, b in files.items())  # the base shards are as they were
    assert len(list(base["cache"].rglob("shard-*.arrow"))) > len(files)  # the variant has its own


def test_self_debias_pass(smollm2_fp32, short_prompt, splits, base):
    model, tok = smollm2_fp32
    val = splits["validation"]
    lp, info = R.self_debias_logprobs(model, tok, val, short_prompt, base["validation"], CFG)
    arr = R.score_arrays(base["validation"])
    assert lp.shape == arr["topk_logprobs"].shape and np.isfinite(lp).all()
    np.testing.assert_allclose(np.exp(lp).sum(1), 1, atol=1e-5)
    assert info["passes"] == len(val) and info["prefixes"]["gender"] == V.prefixes_for("gender")
    assert not np.allclose(lp, _lsm(arr["topk_logprobs"]), atol=1e-4)  # the prefix moved something
    # every slot's Δ recomputed from a direct pass: rows with Δ >= 0 everywhere are the base renormalised
    biased = passes.score_at_ids(model, tok, val, V.with_prefix(short_prompt, info["prefixes"]["gender"][0]),
                                 arr["topk_ids"], CFG)
    untouched = (np.exp(arr["topk_logprobs"]) >= np.exp(biased)).all(1)
    np.testing.assert_allclose(lp[untouched], _lsm(arr["topk_logprobs"][untouched]), atol=1e-5)
    moved = ~untouched
    assert moved.any()


# ----------------------------------------------------------------------------- steering (model)


def _steer(model, layer=10, strength=4.0, threshold=0.0, bias=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    return Steering.from_arrays(torch.randn(d, generator=g).numpy(), bias, torch.randn(d, generator=g).numpy(),
                                layer, strength, threshold, model.config.num_hidden_layers)


def test_steering_off_is_bit_identical(smollm2_fp32, short_prompt, splits, base, tmp_path):
    model, tok = smollm2_fp32
    val = splits["validation"]
    offs = (_steer(model, strength=0.0), _steer(model, threshold=0.5, bias=-1e9))  # no strength; a probe that never fires
    for off in offs:
        sc = R.score_steered(model, tok, val, short_prompt, CFG, off, cache_dir=tmp_path, model_key="smol")
        assert _same(sc, base["validation"])
    assert offs[1].stats == {"rows": len(val), "fired": 0}
    assert {p.name for p in tmp_path.iterdir()} == {f"smol-steer-{s.fingerprint}" for s in offs}  # cached apart


def test_firing_probe_moves_logits_same_on_both_paths(smollm2_fp32, short_prompt, splits, base):
    model, tok = smollm2_fp32
    val = splits["validation"]
    ids = R.score_arrays(base["validation"])["topk_ids"]
    on = _steer(model)
    with on.apply(model):
        lp_pre = passes.score_at_ids(model, tok, val, short_prompt, ids, CFG)
    assert on.stats == {"rows": len(val), "fired": len(val)}
    with on.apply(model):  # left-padded whole prompts: the answer column is the last one
        lp_whole = passes.score_at_ids(model, tok, val, short_prompt, ids, ScoringConfig(batch_size=8, prefix_cache=False))
    base_lp = R.score_arrays(base["validation"])["topk_logprobs"]
    assert np.abs(lp_pre - base_lp).max() > 0.1
    np.testing.assert_allclose(lp_pre, lp_whole, atol=2e-4)


def test_probe_gates_rows(smollm2_fp32, short_prompt, splits, base):
    model, tok = smollm2_fp32
    val = splits["validation"]
    arr = R.score_arrays(base["validation"])
    s = _steer(model, layer=12, threshold=0.5)
    X = passes.collect_activations(model, tok, val, short_prompt, [12], CFG)[:, 0]  # (M, d)
    logits = X @ s.probe_weight.numpy()
    s.probe_bias.fill_(-float(np.median(logits)))  # fires on about half the rows
    with s.apply(model):
        lp = passes.score_at_ids(model, tok, val, short_prompt, arr["topk_ids"], CFG)
    fired = torch.cat(s.fired).numpy()
    assert 0 < fired.sum() < len(fired)
    assert np.array_equal(lp[~fired], arr["topk_logprobs"][~fired])  # untouched rows: bit-identical
    assert (np.abs(lp[fired] - arr["topk_logprobs"][fired]).max(1) > 1e-3).all()


def test_captured_activations_are_hidden_states(smollm2_fp32, short_prompt, splits):
    model, tok = smollm2_fp32
    val = splits["validation"][:3]
    X = passes.collect_activations(model, tok, val, short_prompt, [3, 20], CFG)
    Xw = passes.collect_activations(model, tok, val, short_prompt, [3, 20], ScoringConfig(batch_size=8, prefix_cache=False))
    np.testing.assert_allclose(X, Xw, atol=1e-4)
    text = short_prompt.render(val[1]["context"], val[1]["question"])
    with torch.no_grad():
        hs = model(torch.tensor([tok(text)["input_ids"]]), output_hidden_states=True).hidden_states
    for j, layer in enumerate((3, 20)):
        np.testing.assert_allclose(X[1, j], hs[layer + 1][0, -1].numpy(), atol=1e-4)


def test_steering_in_generate(smollm2_fp32, short_prompt, splits):
    model, tok = smollm2_fp32
    texts = [short_prompt.render(r["context"], r["question"]) for r in splits["validation"][:2]]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=2, do_sample=False, output_scores=True, return_dict_in_generate=True,
              pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        ref = model.generate(**enc, **kw)
        with _steer(model, strength=0.0).apply(model):
            off = model.generate(**enc, **kw)
        with _steer(model, strength=8.0).apply(model) as on:
            moved = model.generate(**enc, **kw)
    assert torch.equal(ref.sequences, off.sequences) and all(torch.equal(a, b) for a, b in zip(ref.scores, off.scores))
    assert (ref.scores[0] - moved.scores[0]).abs().max() > 0.1
    assert on.stats["rows"] == 4  # two rows x two steps: prefill's last token, then the new token


def test_steering_save_load(smollm2_fp32, tmp_path):
    from refine_llm.vocab import tokenizer_fingerprint

    model, tok = smollm2_fp32
    s = _steer(model, strength=1.5, threshold=0.4)
    s.save_pretrained(tmp_path / "st", meta={"base_model": "smollm2", "tokenizer_fingerprint": tokenizer_fingerprint(tok),
                                             "category": "gender", "labels": {"commitment_biased_min": 0.7}})
    t = Steering.from_pretrained(tmp_path / "st", tokenizer=tok, model=model)
    for name in ("probe_weight", "probe_bias", "vector"):
        assert torch.equal(getattr(s, name), getattr(t, name))
    assert (t.layer, t.strength, t.threshold, t.fingerprint) == (s.layer, s.strength, s.threshold, s.fingerprint)
    assert t.meta["labels"] == {"commitment_biased_min": 0.7}
    assert "layer 10" in (tmp_path / "st" / "README.md").read_text()

    cfg = json.loads((tmp_path / "st" / "config.json").read_text())
    (tmp_path / "other").mkdir()
    for f in ("model.safetensors", "README.md"):
        (tmp_path / "other" / f).write_bytes((tmp_path / "st" / f).read_bytes())
    (tmp_path / "other" / "config.json").write_text(json.dumps({**cfg, "tokenizer_fingerprint": "sha256:x"}))
    with pytest.raises(UserError, match="another tokenizer"):
        Steering.from_pretrained(tmp_path / "other", tokenizer=tok)
    Steering.from_arrays(np.ones(8), 0.0, np.ones(8), 1).save_pretrained(tmp_path / "small")
    with pytest.raises(UserError, match="hidden size 8"):
        Steering.from_pretrained(tmp_path / "small", model=model)
    raw = bytearray((tmp_path / "st" / "model.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "st" / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(UserError, match="not the weights"):
        Steering.from_pretrained(tmp_path / "st")
    with pytest.raises(UserError, match="not a saved steering"):
        Steering.from_pretrained(tmp_path / "nowhere")


def test_train_steering_end_to_end(smollm2_fp32, short_prompt, splits, base, tmp_path):
    model, tok = smollm2_fp32
    cfg = SteerConfig(layers=(6, 14), strengths=(2.0,), strength_tuples=1, max_kl=10.0, max_gold_drop=1.0)
    steer, rep = R.train_steering(model, tok, short_prompt, splits["train"], base["train"], splits["validation"],
                                  base["validation"], CFG, cfg, meta={"category": "gender"})
    assert rep["layer"] in (6, 14) and [r["layer"] for r in rep["layers"]] == [6, 14]
    assert [r["strength"] for r in rep["strengths"]] == [0.0, 2.0] and rep["strengths"][0]["kl_base"] == 0
    assert rep["strength"] in (0.0, 2.0) and steer.strength == rep["strength"]
    assert rep["labels"]["train_biased"] > 0 and rep["labels"]["train_specified_negatives"] == 4
    steer.save_pretrained(tmp_path / "st")
    back = Steering.from_pretrained(tmp_path / "st", model=model)
    assert back.meta["category"] == "gender" and back.meta["candidate_layers"] == [6, 14]


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("argv, match", [
    (["--prompt", "nope"], "no such built-in prompt"),
    (["--self-debias-prefixes", "/nonexistent.txt"], "no such file"),
    (["--tuples", "0"], "--tuples"),
])
def test_smoke_cli_bad_input(argv, match):
    r = subprocess.run([sys.executable, str(ROOT / "eval" / "methods_smoke.py"), *argv], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], r.stderr
