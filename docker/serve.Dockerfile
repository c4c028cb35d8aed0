# mllm serve: an OpenAI-compatible completions API on a CPU, in a slim image.
#
#   docker build -f docker/serve.Dockerfile -t mllm-serve .
#   docker run --rm -p 8000:8000 -v "$PWD/runs:/workspace/runs:ro" mllm-serve --run-dir runs/default
#
# The container serves on 0.0.0.0:8000 as a non-root user; the run folder (checkpoints and the
# tokenizer.json beside them) comes in as a read-only volume. Flags after the image name go to
# `mllm serve` (e.g. --model-name, --max-batch-size).
FROM python:3.11.13-slim-bookworm

# CPU-only PyTorch: the default wheel bundles CUDA libraries (gigabytes) a CPU server never uses.
ARG TORCH_VERSION=2.9.1
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

WORKDIR /opt/mllm
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN pip install --no-cache-dir "/opt/mllm[serve]" \
    && groupadd --gid 10001 mllm \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin mllm

WORKDIR /workspace
USER 10001:10001
EXPOSE 8000

# No curl in a slim image: the standard library checks /health (a non-2xx or no answer raises).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["mllm", "serve", "--host", "0.0.0.0", "--port", "8000"]
