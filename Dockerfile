# The playground on a CUDA machine: the gpu extra (vLLM 0.26.0, GPTQModel 7.6.0) on torch 2.11 + CUDA 13,
# serving on 7860. Docker cannot build on the project's CPU machines; `hadolint Dockerfile` checks it.
#   docker build -t inference-playground . && docker run --gpus all -p 7860:7860 inference-playground
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The distribution's python3 and compiler follow the base image's security updates; pinning them
# would break the build at each point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install "pip==25.3" "setuptools==80.9.0" "wheel==0.45.1" \
    && pip install "torch==2.11.0" --index-url https://download.pytorch.org/whl/cu130 \
    && useradd --create-home --uid 1000 user

WORKDIR /home/user/app
COPY --chown=user pyproject.toml README.md ./
COPY --chown=user engines ./engines
COPY --chown=user app ./app
COPY --chown=user assets ./assets
COPY --chown=user scripts ./scripts

# gptqmodel ships an sdist whose build imports torch, so the build sees the torch installed above.
# The project itself is the local folder; every dependency is pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-build-isolation ".[gpu]"

USER 1000
# Convert the embedded model once at build time, so the first page load does not wait for it.
RUN python -c "from engines.models.sources import resolve_model; print(resolve_model().path)"

EXPOSE 7860
CMD ["python", "-m", "app", "--host", "0.0.0.0", "--port", "7860"]
