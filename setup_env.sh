#!/usr/bin/env bash
# Sets up the environment mllm runs in, once; a second run changes nothing and returns at once.
#
#   bash setup_env.sh                 # create or update the environment
#   bash setup_env.sh --print-python  # print the interpreter of that environment (used by make)
#
# With conda: the env `minimal-llm` (Python 3.11) from environment.cuda.yaml (Linux/Windows) or
# environment.metal.yaml (macOS). Without conda: a `.venv` here, made with pip; on a machine with
# no NVIDIA GPU and no Mac it installs the CPU build pinned in MLLM_TORCH_SPEC first, so pip does
# not pull a multi-GB CUDA build. Set MLLM_USE_VENV=1 to use a venv even where conda exists.
set -euo pipefail
cd "$(dirname "$0")"

ENV_NAME=minimal-llm
VENV=.venv
TORCH_SPEC=${MLLM_TORCH_SPEC:-torch==2.13.0}

if [[ "$(uname -s)" == "Darwin" ]]; then
  YAML=environment.metal.yaml
else
  YAML=environment.cuda.yaml
fi

use_conda() {
  [[ "${MLLM_USE_VENV:-0}" != "1" ]] && command -v conda >/dev/null 2>&1
}

conda_prefix() {
  conda env list 2>/dev/null | awk -v n="$ENV_NAME" '$1 == n {print $NF}'
}

python_path() {
  if use_conda; then
    local prefix
    prefix=$(conda_prefix)
    [[ -n "$prefix" ]] && echo "$prefix/bin/python" && return
    echo "conda env $ENV_NAME does not exist yet: run 'bash setup_env.sh'" >&2
    return 1
  fi
  echo "$PWD/$VENV/bin/python"
}

if [[ "${1:-}" == "--print-python" ]]; then
  python_path
  exit
fi

# The fingerprint of everything that decides what gets installed: unchanged means nothing to do.
fingerprint=$(cat pyproject.toml "$YAML" setup_env.sh | sha256sum | cut -c1-16)

if use_conda; then
  prefix=$(conda_prefix)
  stamp="$prefix/.mllm-setup"
  if [[ -n "$prefix" && -f "$stamp" && "$(cat "$stamp")" == "$fingerprint" ]]; then
    echo "conda env $ENV_NAME is up to date ($prefix)"
    exit 0
  fi
  if [[ -n "$prefix" ]]; then
    echo "updating conda env $ENV_NAME from $YAML"
    conda env update -n "$ENV_NAME" -f "$YAML" --prune
  else
    echo "creating conda env $ENV_NAME from $YAML"
    conda env create -n "$ENV_NAME" -f "$YAML"
  fi
  prefix=$(conda_prefix)
  echo "$fingerprint" >"$prefix/.mllm-setup"
  echo "done: conda activate $ENV_NAME"
  exit 0
fi

stamp="$VENV/.mllm-setup"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$fingerprint" ]]; then
  echo "$VENV is up to date"
  exit 0
fi

echo "conda not found (or MLLM_USE_VENV=1): setting up $VENV with pip"
PY=${PYTHON:-python3}
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if [[ "$(uname -s)" != "Darwin" ]] && ! command -v nvidia-smi >/dev/null 2>&1; then
  if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "no NVIDIA GPU found: installing the CPU build $TORCH_SPEC first"
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  fi
fi
"$VENV/bin/python" -m pip install -q -e ".[dev]"
echo "$fingerprint" >"$stamp"
echo "done: source $VENV/bin/activate"
