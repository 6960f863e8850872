# syntax=docker/dockerfile:1
#
# One image for every process of the service: the API, the job worker (`byol worker`), the MLflow
# tracking server and the Ray head and worker nodes.
#
#   docker build -t byol:cpu .                             # torch from the PyTorch CPU index
#   docker build --build-arg VARIANT=cuda -t byol:cuda .   # PyPI's torch: CUDA runtime included,
#                                                          # the host needs only the NVIDIA driver
#
# Python and Ray must be the same on every node and driver of a Ray cluster (Ray refuses a
# mismatch), so both variants share PYTHON_VERSION and RAY_VERSION; the versions are the ones
# pyproject.toml pins (tests/test_deployment.py checks that they agree).

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG VARIANT=cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG RAY_VERSION=2.60.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# torch first: the largest layer and the only one that differs between the variants, so a change
# of the other dependencies or of the code does not download it again.
RUN --mount=type=cache,target=/root/.cache/pip \
    case "$VARIANT" in \
        cpu) index=https://download.pytorch.org/whl/cpu ;; \
        cuda) index=https://pypi.org/simple ;; \
        *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; \
    esac \
    && pip install --index-url "$index" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# The dependencies from pyproject.toml alone, so that editing the code keeps this layer.
# ray[default] adds the dashboard and the cluster CLI that the head and worker nodes use. The
# check after it fails the build if the resolver swapped the variant's torch for another build.
COPY pyproject.toml /src/pyproject.toml
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; \
print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "ray[default]==${RAY_VERSION}" \
    && python -c "import sys, torch; \
cpu_build = torch.version.cuda is None; \
sys.exit(0 if cpu_build == ('${VARIANT}' == 'cpu') else 'torch was replaced: ' + torch.__version__)"

COPY README.md /src/README.md
COPY byol_core /src/byol_core
COPY service /src/service
COPY worker /src/worker
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps /src


FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="byol-service" \
      org.opencontainers.image.description="BYOL training service: API, job worker, MLflow, Ray nodes" \
      byol.variant="${VARIANT}"

# A fixed uid, so files on shared volumes (run folders, Ray checkpoints) have one owner whichever
# container wrote them. The folders exist in the image owned by that user: a named volume mounted
# on them starts with that ownership.
RUN groupadd --gid 1000 byol \
    && useradd --uid 1000 --gid byol --create-home --shell /usr/sbin/nologin byol \
    && mkdir -p /srv/byol/data /srv/byol/runs /srv/mlflow/artifacts \
    && chown -R byol:byol /srv/byol /srv/mlflow

COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RAY_TRAIN_V2_ENABLED=1

USER byol
WORKDIR /srv/byol
EXPOSE 8000 5000 6379 8265
CMD ["uvicorn", "--factory", "service.app:create_app", "--host", "0.0.0.0", "--port", "8000"]
