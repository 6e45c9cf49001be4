# One image for every pipeline component: Kubeflow runs each step in it with the step's own command, so the image
# has no ENTRYPOINT (KFP's `sh -c …` would become arguments to it). Build it with `rlhf image build`, which tags it by
# the content of the build context (see docs/deployment.md, "The container image"); by hand:
#   docker build -t REGISTRY/rlhf-pipeline:TAG .                                       # CPU PyTorch (default)
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t REGISTRY/rlhf-pipeline:TAG-cuda .
# PyTorch's CUDA wheels carry their CUDA libraries, so one slim base serves both; the GPU node supplies the driver.
# BASE_IMAGE: python:3.11-slim, an internal mirror of it, or any Debian/Ubuntu base with python3 and python3-venv
# (`rlhf image build --debian-base` makes one with debootstrap when no registry is reachable).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS deps
# Where torch comes from: PyTorch's CPU index by default, its cu128 index for the CUDA variant, or empty for pip's
# own configuration (a mirror; `rlhf image build --host-pip` mounts this machine's).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# cpu or cuda: named in the install step so that the two variants never share its cached layer.
ARG TORCH_VARIANT=cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# A venv: Debian's own Python refuses system-wide installs (PEP 668), and one folder is easy to copy below.
RUN python3 -m venv /opt/venv
WORKDIR /opt/rlhf
COPY constraints.txt pyproject.toml ./
# The dependencies first, from the lock, in a layer that a source change does not invalidate.
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && echo "installing the dependencies with the ${TORCH_VARIANT} build of torch" \
    && /opt/venv/bin/pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        -c constraints.txt -r requirements.txt

# The project itself as a wheel, so that a source change rebuilds only a small layer of the final image.
FROM deps AS project
COPY README.md ./
COPY src ./src
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /opt/rlhf-wheel .

FROM ${BASE_IMAGE}
RUN useradd --create-home --uid 1000 rlhf && mkdir -p /home/rlhf/.cache/huggingface && chown -R rlhf /home/rlhf
# The dependencies before anything that changes with the source: a new source reuses this layer.
COPY --from=deps /opt/venv /opt/venv
# SOURCE_HASH: the hash of the build context that `rlhf image build` tags the image with; GIT_COMMIT: the commit it
# was built from. Both land on every MLflow run made in the image (rlhf.image_source, rlhf.git_commit). The image has
# no git: GIT_PYTHON_REFRESH=quiet keeps MLflow from warning about it in every step.
ARG SOURCE_HASH=unknown
ARG GIT_COMMIT=
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="rlhf-pipeline" org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${GIT_COMMIT}" io.rlhf.source-hash="${SOURCE_HASH}" \
      io.rlhf.torch-variant="${TORCH_VARIANT}"
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HOME=/home/rlhf/.cache/huggingface \
    MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 HF_HUB_DISABLE_TELEMETRY=1 GIT_PYTHON_REFRESH=quiet \
    RLHF_IMAGE_SOURCE=${SOURCE_HASH} RLHF_GIT_COMMIT=${GIT_COMMIT}
COPY --from=project /opt/rlhf-wheel /opt/rlhf-wheel
RUN pip install --no-deps --no-cache-dir /opt/rlhf-wheel/*.whl && rm -rf /opt/rlhf-wheel \
    && python -c "import rlhf.cli, rlhf.components.definitions, torch; print('torch', torch.__version__)"
USER rlhf
WORKDIR /home/rlhf
