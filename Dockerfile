# One image for every stage. CPU PyTorch by default; the Kubeflow issue adds the CUDA base build argument.
FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 HF_HOME=/home/rlhf/.cache/huggingface \
    MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 rlhf
WORKDIR /opt/rlhf
COPY constraints.txt pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir -c constraints.txt . 
USER rlhf
WORKDIR /home/rlhf
ENTRYPOINT ["rlhf"]
