"""The main job's stages, each reading the files the previous ones left in the run directory and writing its own:

    questions   questions/                      the question set (refine_llm.questions)
    score       scores/, scores/score.json      every prompt the run needs, scored once, up front: the prompt
                                                sweep, the splits, the anchor and unrelated prompts, BBQ, the
                                                bf16 test set of --compare-quant, every method's extra pass
    train       heads/<variant>/, heads/bbq/head, adapters/<method>/, train.json
                                                (per seed under seeds/seed-<s>/); reads only the cache
    evaluate    evaluation.json, predictions.parquet, bbq/bbq.json
                                                every condition through the methods protocol, its heads and
                                                adapters loaded with from_pretrained
    report      report.json, per_tuple.json, report.md, plots/*.png
                                                rendered from the files above alone

``refine_llm.pipeline.run`` chains them; ``refine-llm score|train|evaluate|report`` runs one. ``common`` holds
what every stage shares (the run directory's layout, the model key, reading the cache).
"""

STAGES = ("questions", "score", "train", "evaluate", "report")

__all__ = ["STAGES"]
