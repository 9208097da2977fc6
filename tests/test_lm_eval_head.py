"""lm-evaluation-harness with a REFINE head: a local 4-question multiple-choice task run through
RefineHFLM on the session SmolLM2 (fp32). An identity head changes nothing; a uniform head changes
exactly the answer slot's top-k log-probs, as refine_llm.metrics.candidate_probs_full says."""

from __future__ import annotations

import json
import os

import pytest

if os.environ.get("CI") != "true":
    import lm_eval  # noqa: F401  (required: a missing lm_eval fails, never skips)

import torch  # noqa: E402

from refine_llm import head as H  # noqa: E402
from refine_llm.config import HeadConfig  # noqa: E402

DOCS = [
    {"context": "Mary paid for the tickets, and Tom said thank you.", "question": "Who paid?", "choices": ["Mary", "Tom"], "gold": 0},
    {"context": "The baker fed the cat while the pilot slept.", "question": "Who slept?", "choices": ["baker", "pilot"], "gold": 1},
    {"context": "Aisha wrote the letter that Omar posted.", "question": "Who wrote the letter?", "choices": ["Aisha", "Omar"], "gold": 0},
    {"context": "Ken lost his keys and Yuki found them.", "question": "Who found the keys?", "choices": ["Ken", "Yuki"], "gold": 1},
]


def _task_dir(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in DOCS) + "\n")
    (tmp_path / "refine_tiny_mc.yaml").write_text(
        "task: refine_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}\\nQuestion: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: gold\n"
        'target_delimiter: " "\n'
        "metric_list:\n  - metric: acc\n"
    )
    return tmp_path


def _run(lm, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    # include_defaults=False: index only the local task, not lm-eval's thousands of built-in YAMLs
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["refine_tiny_mc"], task_manager=tm, log_samples=True, bootstrap_iters=0)
    samples = out["samples"]["refine_tiny_mc"]
    lls = [r[0][0] for s in sorted(samples, key=lambda s: s["doc_id"]) for r in s["resps"]]  # (doc, choice) flat
    return out["results"]["refine_tiny_mc"]["acc,none"], lls


def test_refine_hflm_applies_the_head_at_the_answer_slot_only(tmp_path, smollm2_fp32):
    from lm_eval.models.huggingface import HFLM

    from refine_llm.lm_eval_head import RefineHFLM, apply_head_to_row

    model, tok = smollm2_fp32
    task_dir = _task_dir(tmp_path / "task")
    fp = H.tokenizer_fingerprint(tok)
    for variant in ("logit", "uniform"):
        H.save_head(H.build_head(HeadConfig(variant=variant, k=10)), tmp_path / variant, {"tokenizer_fingerprint": fp})

    acc0, base = _run(HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu"), task_dir)
    acc_id, ident = _run(RefineHFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu",
                                    head=str(tmp_path / "logit")), task_dir)
    assert acc_id == acc0 and 0.0 <= acc0 <= 1.0
    assert ident == pytest.approx(base, abs=1e-4)  # identity-initialised head: the model as it is
    acc_u, uni = _run(RefineHFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu",
                                 head=str(tmp_path / "uniform")), task_dir)
    assert uni != pytest.approx(base, abs=1e-4)
    # by hand on the first question: the answer slot's row, flattened over its top-10, gives the first
    # token's log-prob; the answer " Mary" is one token, so that is the whole loglikelihood
    ids = tok(DOCS[0]["context"] + "\nQuestion: " + DOCS[0]["question"] + "\nAnswer:")["input_ids"]
    cont = tok(DOCS[0]["context"] + "\nQuestion: " + DOCS[0]["question"] + "\nAnswer: Mary")["input_ids"][len(ids):]
    with torch.no_grad():
        row = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
    new = apply_head_to_row(H.build_head(HeadConfig(variant="uniform", k=10)), row, 10)
    top = torch.topk(row, 10)
    assert torch.logsumexp(new, 0).item() == pytest.approx(0.0, abs=1e-4)  # still a distribution
    assert new[top.indices].tolist() == pytest.approx([torch.logsumexp(top.values, 0).item() - torch.log(torch.tensor(10.0)).item()] * 10, abs=1e-5)
    if len(cont) == 1:
        assert uni[0] == pytest.approx(new[cont[0]].item(), abs=1e-3)
