# Two entry points for a fresh machine; both create/reuse .venv/ via scripts/bootstrap.sh.
#   make debias   - the main job on the embedded default model (SmolLM2-135M, CPU)
#   make test     - the whole test suite
# Extra arguments for the main job: make debias ARGS="--category all --max-tuples 100"
PY := .venv/bin/python

.PHONY: debias test venv
venv:
	@bash scripts/bootstrap.sh

debias: venv
	$(PY) scripts/debias_llm.py $(ARGS)

test: venv
	$(PY) -m pytest -q $(ARGS)
