"""The scoring commands: ``score`` a questions dataset (one shard, all of it, or on Ray), ``merge`` shard
caches, ``evaluate`` the base model straight from a cache. Flags from refine_llm.config (ScoreArgs,
MergeArgs, CacheMetricsArgs) through refine_llm.cliargs.

    python -m refine_llm.scoring score --questions Q --prompt qa --quant fp32 --out runs/s0 --shard 0/4
    python -m refine_llm.scoring merge runs/s0 runs/s1 runs/s2 runs/s3 --out runs/all
    python -m refine_llm.scoring evaluate --questions Q --scores runs/all
    refine-llm score --questions Q ... / refine-llm merge ...       (the same, through the refine-llm command)
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from refine_llm.config import AUTO_SCORING_BATCH_SIZE, CacheMetricsArgs, MergeArgs, ScoreArgs
from refine_llm.errors import UserError

__all__ = ["run_score", "score_main", "merge_main", "cache_metrics", "evaluate_main", "main"]


def run_score(args: ScoreArgs) -> dict:
    """Score per ``args``; returns the run's manifest plus counts."""
    from refine_llm import models, prompts
    from refine_llm.io import check_writable
    from refine_llm.model_check import check_model
    from refine_llm.scoring import cache
    from refine_llm.scoring.driver import LocalPool, fill_cache
    from refine_llm.scoring.plan import Shard, questions_table

    shard = Shard.parse(args.shard)
    cfg, mcfg, ray = args.scoring, args.model, args.ray
    if cfg.batch_size is None:  # ScoringConfig's "auto", resolved once here: every shard of a job must share it
        gpu = cfg.backend == "ray" and ray.gpus_per_actor > 0
        cfg = replace(cfg, batch_size=AUTO_SCORING_BATCH_SIZE["cuda" if gpu or str(mcfg.device or "").startswith("cuda")
                                                             else "cpu"])
    if cfg.backend == "ray":
        cfg = replace(cfg, tensor_parallel_size=max(1, int(ray.gpus_per_actor)))
    if cfg.prompt == "auto":
        raise UserError("--prompt auto: choose one here (paper, qa, chat or a file); the main job picks it on validation")
    prompt = prompts.load_prompt(cfg.prompt)
    check_model(mcfg.name, mcfg.trust_remote_code)  # a model that needs remote code: one line, before it loads
    q = questions_table(args.questions)
    run = Path(args.out)
    check_writable(run)
    source = models.resolve(mcfg.name)
    use_vllm = cfg.backend == "vllm" or (cfg.backend == "ray" and ray.gpus_per_actor > 0)
    scorer_name = f"vllm-{args.vllm_dtype}" if use_vllm else mcfg.quant
    if use_vllm and cfg.store_hidden:
        raise UserError("--store-hidden needs the hf scorer (vLLM returns no hidden states): drop it or use --backend hf")
    model_key = f"{models.fingerprint(source)}-{scorer_name}"
    path = cache.cache_path(run / "scores", model_key, prompt, cfg)
    kw = dict(shard=shard, flush_rows=args.flush_rows, progress=not args.quiet)
    if cfg.backend == "ray":
        from refine_llm.scoring.backends import ray as ray_backend

        pool = ray_backend.RayPool(mcfg.name, mcfg.quant, prompt, cfg, device=mcfg.device,
                                   trust_remote_code=mcfg.trust_remote_code, num_actors=ray.actors,
                                   cpus_per_actor=ray.cpus_per_actor, gpus_per_actor=ray.gpus_per_actor,
                                   vllm_dtype=args.vllm_dtype)
        with ray_backend.cluster(ray.address, ray.local_cpus):
            st = fill_cache(q, cfg, path, pool, **kw)
    else:
        if use_vllm:
            from refine_llm.scoring.backends.vllm import VLLMBackend

            tok = models.load_tokenizer(mcfg.name, trust_remote_code=mcfg.trust_remote_code)
            backend = VLLMBackend(models.model_dir(source), tok, prompt, cfg, args.vllm_dtype)
        else:
            from refine_llm.scoring.backends.hf import HFBackend

            model, tok = models.load_model(mcfg.name, quant=mcfg.quant, device=mcfg.device,
                                           trust_remote_code=mcfg.trust_remote_code)
            backend = HFBackend(model, tok, prompt, cfg)
        st = fill_cache(q, cfg, path, LocalPool(backend), **kw)
    man = cache.write_manifest(run, path, q, st, shard, cfg, {"name": mcfg.name, "fingerprint": model_key.rsplit("-", 1)[0],
                                                              "quant": mcfg.quant, "scorer": scorer_name}, prompt)
    return {**man, **{k: v for k, v in st.items() if k != "tables"}}


def _guard(fn) -> int:
    try:
        return fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def score_main(argv: list[str] | None = None, prog: str = "python -m refine_llm.scoring score") -> int:
    """`refine-llm score --questions Q ...` / `python -m refine_llm.scoring score`."""
    def go() -> int:
        from refine_llm.cliargs import parse_config

        args = parse_config(ScoreArgs, argv, prog)
        st = run_score(args)
        print(f"shard {args.shard}: batches {st['batch_range'][0]}..{st['batch_range'][1]} (rows {st['row_range'][0]}.."
              f"{st['row_range'][1]} of {st['unique']}), {st['pending_batches']} batches scored, {st['written_rows']} new "
              f"rows in {st['seconds']:.1f} s -> {Path(args.out) / st['cache']}")
        return 0
    return _guard(go)


def merge_main(argv: list[str] | None = None, prog: str = "python -m refine_llm.scoring merge") -> int:
    """`refine-llm merge` / `python -m refine_llm.scoring merge`."""
    def go() -> int:
        from refine_llm.cliargs import parse_config
        from refine_llm.scoring.cache import merge

        args = parse_config(MergeArgs, argv, prog)
        rep = merge(args.runs, args.out, args.questions)
        print(f"merged {len(rep['runs'])} runs: {rep['rows']} rows, {rep['duplicates']} duplicate question ids dropped "
              f"-> {rep['out']}")
        for g in rep["gaps"]:
            print(f"gap: {g}")
        return 0
    return _guard(go)


def cache_metrics(questions, scores) -> dict:
    """``metrics.evaluate``'s main keys for the base model, from the score cache ``scores`` (a run directory
    or cache directory) over ``questions``, in bounded memory (``refine_llm.metrics.stream``)."""
    from refine_llm.metrics import stream
    from refine_llm.scoring import cache
    from refine_llm.scoring.plan import questions_table

    path = cache.cache_of_run(scores)
    q = questions_table(questions, stream.NEEDED)
    return stream.evaluate_cache(q, cache.read_ids_chunks(path),
                                 lambda: cache.record_batches(path, stream.SCORE_FIELDS), where=str(scores))


def evaluate_main(argv: list[str] | None = None, prog: str = "python -m refine_llm.scoring evaluate") -> int:
    """`python -m refine_llm.scoring evaluate --questions Q --scores RUN [--out FILE]`."""
    def go() -> int:
        from refine_llm.cliargs import parse_config

        args = parse_config(CacheMetricsArgs, argv, prog)
        res = cache_metrics(args.questions, args.scores)
        if args.out:
            from refine_llm.io import atomic_write_json

            atomic_write_json(args.out, res)
        keys = ("n_rows", "n_tuples", "mu", "eta", "positional_error", "attributive_error", "specified_accuracy",
                "answer_mass", "topk_miss_rate")
        print(json.dumps({k: res[k] for k in keys}))
        return 0
    return _guard(go)


COMMANDS = {"score": score_main, "merge": merge_main, "evaluate": evaluate_main}


def main(argv: list[str] | None = None) -> int:
    """`python -m refine_llm.scoring {score,merge,evaluate} ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m refine_llm.scoring {score,merge,evaluate} ... (see <command> --help)", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:], prog=f"python -m refine_llm.scoring {argv[0]}")
