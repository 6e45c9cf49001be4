# One image for every pipeline component (Kubeflow runs each step in it with its own command).
#   docker build -t REGISTRY/rlhf-pipeline:TAG .                                  # CPU PyTorch (default)
#   docker build --build-arg TORCH_VARIANT=cu128 -t REGISTRY/rlhf-pipeline:TAG-cuda .   # CUDA 12.8 PyTorch
# PyTorch's CUDA wheels carry their CUDA libraries, so the slim Python base serves both; the GPU node supplies the
# driver. BASE_IMAGE swaps the base (e.g. an internal mirror of python:3.11-slim).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH_VARIANT=cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 HF_HOME=/home/rlhf/.cache/huggingface \
    MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 HF_HUB_DISABLE_TELEMETRY=1
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 rlhf
WORKDIR /opt/rlhf
COPY constraints.txt pyproject.toml README.md ./
COPY src ./src
# The lock (constraints.txt) pins every package; torch==2.13.0 resolves to the +cpu or +cuXXX build of that version.
RUN pip install --no-cache-dir --extra-index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        -c constraints.txt . \
    && python -c "import rlhf.cli, rlhf.components.definitions, torch; print('torch', torch.__version__)"
USER rlhf
WORKDIR /home/rlhf
RUN mkdir -p "$HF_HOME"
ENTRYPOINT ["rlhf"]
