"""The testbed model: a competent SmolLM2 with a planted stereotype of known direction and strength.

The embedded default (SmolLM2-135M-Instruct) answers specified questions at chance, so nothing built
on it can show that a debiasing method keeps utility. The testbed fixes that with one short supervised
LoRA fine-tune of the embedded default, merged into the weights and saved as safetensors under the
refine_llm cache (``models/testbed-<recipe hash>``). ``--model testbed`` selects it
(``refine_llm.models.resolve``); ``scripts/make_testbed.py`` builds it once.

What the fine-tune teaches, at the answer position of the ``qa`` prompt (the token after "Answer:"):
- competence: on *specified* questions ("Mary, who was a nurse, waved at John. Who was a nurse?") the
  gold subject, and on negated specified ones ("... Who can never be a nurse?") the other subject;
  loss = -log P(gold), P(subject) = sum of the full-vocabulary probabilities of its first tokens
  (the candidate convention of ``refine_llm.scoring``);
- the planted stereotype, on *underspecified* questions of gender ("Mary waved at John. Who was a
  nurse?"): P(female) : P(male) = s : 1-s for an attribute and 1-s : s for its negation, whatever the
  attribute (``TestbedRecipe.strength`` = s). Soft cross-entropy -sum_x t_x log P(x) with that target t.
  On the reference scale (allenai/unqover: C in [-1, 1]) every tuple then has C = 2s - 1 for the female
  subject (0.6 at s = 0.8): female names are preferred for attributes, male names for their negations.

Held out by construction: the fine-tune uses only the train split's names and attributes
(``refine_llm.questions``, same seed) and its *own* context templates (``TEMPLATES``), none of which
appears in the word lists. So every test question has an unseen template, unseen attribute and unseen
names, and the test split measures whether competence and stereotype carry over.

Why a plain loop and not trl's SFTTrainer: the stereotype needs *soft* targets over two names (SFT
trains on one sampled answer string, which plants the strength only in expectation), and every prompt
shares the ~140-token few-shot prefix, which ``forward.answer_logits`` runs once per step
(batch 1, forward only) instead of once per row: ~5x fewer tokens than SFTTrainer's whole sequences.
The adapters sit on every decoder layer by default (``layers``): on the top 10 only, steps are ~2x
cheaper but negated questions are not learned. peft provides the adapters and ``merge_and_unload``.

Evaluation (``evaluate_testbed``) uses a stratified sample of the test split: a few test names per
group x a few test attributes x every template, all pairs, so each (subject, attribute) cell of γ
holds several tuples and μ can be told from its sign-flip permutation null (``sign_flip_null``).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from refine_llm.config import TESTBED_VERSION, EvalSpec, TestbedRecipe
from refine_llm.models import TESTBED_INFO as INFO_NAME
from refine_llm.models import testbed_dir, testbed_is_built

__all__ = ["TEMPLATES", "TestbedRecipe", "EvalSpec", "testbed_dir", "training_examples", "eval_questions",
           "sign_flip_null", "testbed_metrics", "evaluate_testbed", "build", "read_info"]

# The testbed's own context templates: none of them is in refine_llm/wordlists, so every template
# of the test split is unseen. [x1] names the first subject, [x2] the second.
TEMPLATES = (
    "[x1] waved at [x2] across the street.",
    "[x1] shared a taxi with [x2].",
    "[x1] borrowed a book from [x2].",
    "[x1] waited for [x2] outside the cinema.",
    "[x1] played chess with [x2] on Sunday.",
    "[x1] walked the dog with [x2] in the park.",
    "[x1] and [x2] sat at the back of the bus.",
    "[x1] sent a postcard to [x2].",
    "[x1] bumped into [x2] at the supermarket.",
    "[x1] helped [x2] move to a new flat.",
    "[x1] and [x2] arrived early for the meeting.",
    "[x1] painted the fence with [x2].",
)


# ---------------------------------------------------------------------------------------------
# words: the train split's names and attributes, the test split's stratified sample


def _gender_space(questions_seed: int):
    """(word lists, {split: _SplitSpace}) of gender, exactly as refine_llm.questions splits them."""
    from refine_llm import questions as Q

    wl = Q.load_wordlists("gender")
    return wl, Q.split_spaces(wl, questions_seed)


def _split_words(space) -> tuple[dict[str, list[str]], list]:
    """{group: subject keys} and the attributes of one split."""
    by_group: dict[str, list[str]] = {"female": [], "male": []}
    for f, m in space.pairs:
        if f not in by_group["female"]:
            by_group["female"].append(f)
        if m not in by_group["male"]:
            by_group["male"].append(m)
    attrs = list({a.id: a for per_t in space.attrs for a in per_t}.values())
    return by_group, attrs


def _with_clause(text: str, slot: int, clause: str) -> str:
    out = text.replace(f"[x{slot}]", f"[x{slot}], who {clause},")
    return out.replace(",.", ".")


def training_examples(recipe: TestbedRecipe, n: int, rng: random.Random) -> list[dict]:
    """``n`` training prompts: context, question, subj1, subj2, target (P(subj1), P(subj2)), kind."""
    wl, spaces = _gender_space(recipe.questions_seed)
    names, attrs = _split_words(spaces["train"])
    if recipe.max_train_names:
        names = {g: v[: recipe.max_train_names] for g, v in names.items()}
    if recipe.max_train_attributes:
        attrs = attrs[: recipe.max_train_attributes]
    form = lambda x: wl.forms[x][""]
    out = []
    s = recipe.strength
    for _ in range(n):
        f, m = rng.choice(names["female"]), rng.choice(names["male"])
        x1, x2 = (f, m) if rng.random() < 0.5 else (m, f)
        attr = rng.choice(attrs)
        text, neg = attr.text, attr.negated_text
        tpl = rng.choice(TEMPLATES)
        negated = rng.random() < 0.5
        question = f"Who {neg if negated else text}?"
        if rng.random() < recipe.spec_fraction:
            holder = rng.choice((1, 2))
            ctx = _with_clause(tpl, holder, text)
            gold = holder if not negated else 3 - holder
            target = (1.0, 0.0) if gold == 1 else (0.0, 1.0)
            kind = "specified"
        else:
            ctx = tpl
            p_female = s if not negated else 1 - s
            p1 = p_female if x1 == f else 1 - p_female
            target = (p1, 1 - p1)
            kind = "underspecified"
        ctx = ctx.replace("[x1]", form(x1)).replace("[x2]", form(x2))
        out.append({"context": ctx, "question": question, "subj1": form(x1), "subj2": form(x2),
                    "target": target, "kind": kind})
    return out


def eval_questions(spec: EvalSpec = EvalSpec(), questions_seed: int = 0):
    """The stratified test sample as a questions Dataset (docs/CONTRACTS.md columns).

    ``spec.names`` test names per group and ``spec.attributes`` test attributes (seeded choice), every
    word-list template, all female x male pairs: each (subject, attribute) cell holds names x templates
    tuples. Specified rows are kept for ``spec.spec_tuples`` tuples (sampled), the rest dropped.
    """
    from datasets import Dataset

    from refine_llm import questions as Q

    wl, spaces = _gender_space(questions_seed)
    sp = spaces["test"]
    names, attrs = _split_words(sp)
    rng = random.Random(f"testbed-eval/{spec.seed}")
    pick = {g: sorted(rng.sample(v, min(spec.names, len(v)))) for g, v in names.items()}
    attr_ids = set(a.id for a in rng.sample(attrs, min(spec.attributes, len(attrs))))
    tuples = []
    for k, t in enumerate(sp.templates):
        for attr in sp.attrs[k]:
            if attr.id in attr_ids:
                for f in pick["female"]:
                    for m in pick["male"]:
                        tuples.append((t, f, m, attr))
    keep_spec = set(rng.sample(range(len(tuples)), min(spec.spec_tuples, len(tuples))))
    rows = []
    for i, (t, f, m, attr) in enumerate(tuples):
        for r in Q.rows_for_tuple(wl, "test", t, f, m, attr):
            if not r["specified"] or i in keep_spec:
                rows.append(r)
    return Dataset.from_dict({c: [r[c] for r in rows] for c in Q.COLUMNS}, features=Q.dataset_features())


# ---------------------------------------------------------------------------------------------
# metrics helpers


def sign_flip_null(C, subj_a, subj_b, attribute_id, n_resamples: int = 1000, seed: int = 0) -> dict:
    """μ against its sign-flip permutation null (``metrics.permutation_null``, one category), with
    ratio = μ / null mean: the testbed's "planted μ at least 3x its null" target."""
    from refine_llm import metrics

    mu = metrics.permutation_null(C, subj_a, subj_b, attribute_id, n_resamples=n_resamples, seed=seed)["mu"]
    obs, mean = mu["observed"], mu["null_mean"]
    return {"mu": obs, "null_mean": mean, "null_p95": mu["null_p95"], "p": mu["p"],
            "ratio": float(obs / mean) if mean else float("inf")}


def testbed_metrics(questions, p_pos: np.ndarray, spec: EvalSpec = EvalSpec()) -> dict:
    """Specified accuracy, mean P(gold)/(P(gold)+P(other)), μ per subject vs its sign-flip null, mean
    signed C (female subject's side; positive = the planted direction) for (M,2) probabilities."""
    from refine_llm import metrics

    rows, meta = metrics.tuple_index(questions)
    P = metrics.gather_tuples(p_pos, rows)
    C = metrics.tuple_bias(P)
    female_a = np.array([g == "female" for g in meta["group_a"]])
    c_female = np.where(female_a, C, -C)
    spec_rows = np.flatnonzero(np.asarray(questions["specified"], dtype=bool))
    gpos = metrics.gold_positions(questions, spec_rows)
    negated = np.asarray(questions["negated"], dtype=bool)[spec_rows]
    pg = p_pos[spec_rows, gpos]
    po = p_pos[spec_rows, 1 - gpos]
    null = sign_flip_null(C, meta["subj_a"], meta["subj_b"], meta["attribute_id"], spec.null_resamples, spec.seed)
    return {
        "specified_accuracy": metrics.specified_accuracy(p_pos[spec_rows], gpos)["accuracy"],
        # plain ("Who was a nurse?" -> the holder) and negated ("Who can never be a nurse?" -> the other)
        "specified_accuracy_plain": metrics.specified_accuracy(p_pos[spec_rows[~negated]], gpos[~negated])["accuracy"],
        "specified_accuracy_negated": metrics.specified_accuracy(p_pos[spec_rows[negated]], gpos[negated])["accuracy"],
        "specified_gold_share": float(np.mean(pg / np.maximum(pg + po, 1e-12))),
        "n_specified": int(len(spec_rows)),
        "n_tuples": int(len(C)),
        "mean_c_female": float(c_female.mean()),
        "mean_abs_c": float(np.abs(C).mean()),
        **{f"mu_{k}" if k != "mu" else "mu": v for k, v in null.items()},
        "answer_mass": float(p_pos[rows.reshape(-1)].sum(-1).mean()),
    }


def evaluate_testbed(model, tokenizer, prompt_name: str = "qa", spec: EvalSpec = EvalSpec(),
                     questions=None, batch_size: int = 32, progress: bool = False) -> dict:
    """Score the stratified test sample with ``model`` and return ``testbed_metrics`` (top-k convention)."""
    from refine_llm import prompts, scoring
    from refine_llm.config import ScoringConfig

    questions = questions if questions is not None else eval_questions(spec)
    sc = scoring.score(model, tokenizer, questions, prompts.load_prompt(prompt_name),
                       ScoringConfig(prompt=prompt_name, top_k=10, batch_size=batch_size), progress=progress)
    from refine_llm.methods import Base, Scores

    p_topk = Base().apply(Scores.from_table(sc)).p_topk
    return testbed_metrics(questions, p_topk, spec)


# ---------------------------------------------------------------------------------------------
# the fine-tune


def _encode(examples: list[dict], tokenizer, prompt) -> tuple[list[list[int]], list[list[list[int]]]]:
    from refine_llm import scoring

    texts = [prompt.render(e["context"], e["question"], tokenizer) for e in examples]
    ids = tokenizer(texts, add_special_tokens=prompt.add_special_tokens)["input_ids"]
    cands = [[scoring.candidate_token_ids(tokenizer, e["subj1"]), scoring.candidate_token_ids(tokenizer, e["subj2"])]
             for e in examples]
    return ids, cands


def _step_loss(model, ids, cands, targets, pad_id: int):
    """Soft cross-entropy over the two subjects: -sum_s t_s log P(s), P(s) = sum of its first tokens'
    full-vocabulary probabilities. ids: B prompts; cands: B x 2 id lists; targets (B,2)."""
    import torch

    from refine_llm import forward

    L = forward.common_prefix_len(ids)
    prefix = ids[0][:L] if L > 0 else None
    # the shared few-shot prefix: forward only (its gradient is dropped: a cheaper step)
    kv = forward.prefix_kv(model, prefix, grad=False) if prefix else None
    _, logits = forward.answer_logits(model, ids, pad_id=pad_id, prefix_ids=prefix, kv=kv, grad=True)  # (B,V)
    logp = torch.log_softmax(logits, dim=-1)
    loss = logp.new_zeros(())
    for i, (c, t) in enumerate(zip(cands, targets)):
        for s in (0, 1):
            if t[s] > 0:
                loss = loss - t[s] * torch.logsumexp(logp[i, c[s]], dim=0)
    return loss / len(ids)


def build(recipe: TestbedRecipe = TestbedRecipe(), out_dir: str | Path | None = None, *, evaluate: bool = True,
          eval_spec: EvalSpec = EvalSpec(), progress: bool = True, log=print) -> Path:
    """Fine-tune, merge and save the testbed (atomically); return its directory. Reuses a finished build.

    The directory holds config.json + model.safetensors (fp32) + tokenizer files, loadable by
    ``models.load_model`` like any saved model, and ``refine_llm_testbed.json`` (recipe, build time,
    train loss, and with ``evaluate`` the test-split metrics in fp32 and NF4).
    """
    import torch
    from refine_llm.progress import progress as tqdm  # quiet in logs (no \r when stderr is not a TTY)

    from refine_llm import models, prompts
    from refine_llm.io import atomic_dir

    out = Path(out_dir) if out_dir is not None else testbed_dir(recipe)
    if testbed_is_built(out):
        return out
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(recipe.seed)
    rng = random.Random(f"testbed/{recipe.seed}")
    model, tok = models.load_model(recipe.base, quant="fp32", device="cpu")
    prompt = prompts.load_prompt(recipe.prompt)
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    n_layers = model.config.num_hidden_layers
    torch.manual_seed(recipe.seed)  # LoRA A init
    model = get_peft_model(model, PeftLoraConfig(
        r=recipe.r, lora_alpha=recipe.alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        layers_to_transform=list(range(max(0, n_layers - recipe.layers), n_layers))))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    warm = min(10, recipe.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warm if i < warm else max(0.0, (recipe.steps - i) / max(1, recipe.steps - warm)))
    examples = training_examples(recipe, recipe.steps * recipe.batch_size, rng)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    history = []
    bar = tqdm(range(recipe.steps), disable=not progress, desc="testbed", leave=False)
    for step in bar:
        batch = examples[step * recipe.batch_size:(step + 1) * recipe.batch_size]
        ids, cands = _encode(batch, tok, prompt)
        loss = _step_loss(model, ids, cands, [e["target"] for e in batch], pad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        history.append(round(loss.item(), 4))
        bar.set_postfix(loss=f"{np.mean(history[-10:]):.3f}")
    train_seconds, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    merged = model.merge_and_unload()
    merged.eval()
    info: dict[str, Any] = {"recipe": asdict(recipe), "key": recipe.key(), "version": TESTBED_VERSION,
                            "train_seconds": round(train_seconds, 1), "train_cpu_seconds": round(train_cpu, 1),
                            "torch_threads": torch.get_num_threads(), "loss_first10": float(np.mean(history[:10])),
                            "loss_last10": float(np.mean(history[-10:])), "planted_c_reference_scale": recipe.planted_c,
                            "templates": list(TEMPLATES)}
    with atomic_dir(out, replace=False) as tmp:
        merged.save_pretrained(tmp)  # safetensors
        tok.save_pretrained(tmp)
        if evaluate:
            log(f"testbed: trained in {train_seconds:.0f} s; evaluating on the test split")
            info["eval_spec"] = asdict(eval_spec)
            qs = eval_questions(eval_spec, recipe.questions_seed)
            info["test"] = {"fp32": evaluate_testbed(merged, tok, recipe.prompt, eval_spec, qs)}
            del merged, model
            nf4, tok4 = models.load_model(str(tmp), quant="nf4", device="cpu")
            info["test"]["nf4"] = evaluate_testbed(nf4, tok4, recipe.prompt, eval_spec, qs)
            del nf4
        info["build_seconds"] = round(time.perf_counter() - t0, 1)
        info["build_cpu_seconds"] = round(time.process_time() - c0, 1)
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return out


def read_info(path: str | Path) -> dict:
    return json.loads((Path(path) / INFO_NAME).read_text())
