# The one image of ctrl-pipeline: every pipeline step, the MLflow server and the retraining CronJob run it
# (charts/ctrl-pipeline values `image`; `ctrl compile --image`). CUDA PyTorch base, the project installed
# the way CI installs it (`pip install -c constraints.txt ".[pipeline]"`), a non-root user (UID 1000).
#
#   docker build --build-arg GIT_SHA="$(git rev-parse HEAD)" -t REGISTRY/ctrl-pipeline:TAG .
#
# The base image's torch must be the version constraints.txt holds (tests/test_k8s_image.py checks it).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# the commit the image is built from: names the KFP pipeline version that `ctrl submit` uploads from a pod
ARG GIT_SHA=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    HF_HUB_DISABLE_TELEMETRY=1 \
    DVC_NO_ANALYTICS=1 \
    CTRL_GIT_SHA=${GIT_SHA} \
    CTRL_CHART=/opt/ctrl-pipeline/charts/ctrl-pipeline \
    HOME=/home/ctrl

WORKDIR /opt/ctrl-pipeline
COPY . /opt/ctrl-pipeline

# the same install as `make setup` (less the test extra), plus the MLflow server's database driver
RUN python -m pip install --upgrade "pip>=26" \
 && python -m pip install -c constraints.txt ".[pipeline,server]" \
 && python -c "import torch, ctrl_core, pipelines.cli, pipelines.placement; print('torch', torch.__version__)"

# non-root runtime user; the source tree stays root-owned (read-only root filesystem friendly)
RUN (getent passwd 1000 >/dev/null || useradd --uid 1000 --user-group --no-log-init --create-home \
        --home-dir /home/ctrl --shell /usr/sbin/nologin ctrl) \
 && mkdir -p /home/ctrl /cache \
 && chown 1000:1000 /home/ctrl /cache

USER 1000:1000
CMD ["ctrl", "--help"]
