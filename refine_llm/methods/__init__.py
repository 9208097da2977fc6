"""Debiasing methods other than the heads (issue 23): activation steering (``steer``) and Self-Debias
(``self_debias``). The instruction prompt is a prompt variant (refine_llm.prompt_variants); the glue that
runs each method on a question set is refine_llm.method_runs."""
