# mllm train on an NVIDIA GPU (any mllm command works: the image's entrypoint is `mllm`).
#
#   docker build -f docker/train.Dockerfile -t mllm-train .
#   docker run --rm --gpus all --user "$(id -u):$(id -g)" \
#       -v "$PWD/data:/workspace/data" -v "$PWD/runs:/workspace/runs" mllm-train train --max-steps 2000
#
# The working directory is /workspace, so mllm's default paths (data/, runs/default/) are the two
# volumes: the packed data (train.bin, val.bin, data.json, tokenizer.json) and the run folders.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch.compile (Triton) builds small C launchers at run time: the runtime image has no compiler.
# Distro packages are not pinned: Ubuntu replaces exact versions with security updates, so pins
# break rebuilds; the base image tag is what is pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/mllm
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
# The base image's torch satisfies mllm's torch requirement, so pip keeps it.
RUN pip install --no-cache-dir . \
    && groupadd --gid 10001 mllm \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin mllm \
    && mkdir -p /workspace/data /workspace/runs \
    && chown -R 10001:10001 /workspace

WORKDIR /workspace
USER 10001:10001
VOLUME ["/workspace/data", "/workspace/runs"]

ENTRYPOINT ["mllm"]
CMD ["train"]
