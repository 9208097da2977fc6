"""The BBQ commands (flags from refine_llm.config: BBQPredictionsArgs, BBQEvaluateArgs):

    refine-llm bbq score-predictions FILE_OR_DIR --field NAME [--out result.json]
    refine-llm bbq evaluate DATA_DIR [--model M] [--quant Q] [--head HEAD_DIR ...] [--mode cloze|lettered|both]
                                     [--bbq-max-items N] [--train-head] [--out DIR]
    refine-llm evaluate --bbq DATA_DIR --head HEAD_DIR ...      (the same evaluation: the evaluate stage's
                                                                 saved-head form, refine_llm.cli)
    python -m refine_llm.bbq ...                                (the same as refine-llm bbq)
"""

from __future__ import annotations

import sys
from pathlib import Path

from refine_llm.config import BBQEvaluateArgs, BBQPredictionsArgs
from refine_llm.errors import UserError

__all__ = ["score_predictions_main", "evaluate_main", "EVALUATE_FORM_OVERRIDES", "main"]

# `refine-llm evaluate --bbq DIR --head H`: the same dataclass, the data directory as --bbq and --head required
EVALUATE_FORM_OVERRIDES = {"data": {"positional": False, "flag": "--bbq", "metavar": "DIR"}, "head": {"required": True}}


def score_predictions_main(argv: list[str] | None, prog: str = "refine-llm bbq score-predictions") -> int:
    from refine_llm.cliargs import parse_config
    from refine_llm.io import atomic_write_json, jsonable
    from refine_llm.bbq.data import load_bbq
    from refine_llm.bbq.metrics import score_predictions
    from refine_llm.bbq.report import markdown_table

    a = parse_config(BBQPredictionsArgs, argv, prog)
    items = load_bbq(a.file)
    res = score_predictions(items, a.prediction, a.n_resamples, seed=a.seed)
    print(f"## BBQ, {a.prediction}: {res['n_items']} items, {res['n_unmatched']} unmatched (dropped)\n")
    print("\n".join(markdown_table({a.prediction: res["table"]})))
    if a.out:
        atomic_write_json(a.out, jsonable(res))
        print(f"\nwritten: {a.out}", file=sys.stderr)
    return 0


def evaluate_main(argv: list[str] | None, prog: str = "refine-llm bbq evaluate", evaluate_form: bool = False) -> int:
    """A model and saved heads on BBQ: `refine-llm bbq evaluate DIR` and `refine-llm evaluate --bbq DIR --head H`."""
    from refine_llm import models
    from refine_llm.cliargs import parse_config
    from refine_llm.methods import hub
    from refine_llm.model_check import check_model
    from refine_llm.bbq.data import bbq_files
    from refine_llm.bbq.report import markdown
    from refine_llm.bbq.run import evaluate_model, head_name, items_of, load_heads, save_result, scoring_config

    a = parse_config(BBQEvaluateArgs, argv, prog, overrides=EVALUATE_FORM_OVERRIDES if evaluate_form else None)
    bbq_files(a.data)
    items = items_of(a.data, a.bbq_max_items, a.seed)
    taken: set = set()
    head_paths = {head_name(h, taken): h for h in a.head or []}
    for p in head_paths.values():  # a missing or corrupt head fails here, before the model loads
        hub.read_head_config(p)
    mcfg = a.model
    check_model(mcfg.name)  # a damaged config.json or one that needs remote code: one line, before the model loads
    model, tok = models.load_model(mcfg.name, quant=mcfg.quant, device=mcfg.device)
    heads = load_heads(head_paths, tok, a.scoring.top_k, model.get_output_embeddings().weight.detach().float().cpu())
    need_hidden = any(getattr(h.head, "variant", "") == "contextual" for h in heads.values())
    cfg = scoring_config(a.scoring.top_k, a.batch_size, need_hidden)
    res, _ = evaluate_model(model, tok, items, heads, a.mode, cfg, a.train_head, a.n_resamples, a.seed,
                            cache_dir=Path(a.out) / "scores" if a.out else None, progress=True)
    res["command"] = {"model": mcfg.name, "quant": mcfg.quant, "heads": head_paths, "data": str(a.data),
                      "bbq_max_items": a.bbq_max_items, "mode": a.mode, "seed": a.seed}
    print(markdown(res))
    if a.out:
        save_result(res, a.out, Path(a.out) / "bbq.json", Path(a.out) / "bbq.md")
    return 0


COMMANDS = {"score-predictions": score_predictions_main, "evaluate": evaluate_main}


def main(argv: list[str] | None = None, prog: str = "refine-llm bbq") -> int:
    """`refine-llm bbq {score-predictions,evaluate} ...` and `python -m refine_llm.bbq ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: {prog} {{score-predictions,evaluate}} ... (see <command> --help)\n\n{__doc__}")
            return 0
        print(f"{prog}: error: choose a command: {', '.join(COMMANDS)} (see --help)", file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:], prog=f"{prog} {argv[0]}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
