#!/usr/bin/env bash
# The GPU path, proved in one go on a bare GPU machine (docs/gpu.md):
#   1. setup       - Python, torch, the GPU; installs what is missing from the wheels in .whl/
#   2. cuda_tests  - pytest -m cuda tests/test_cuda.py (training, resume, eval, decoding, engine)
#   3. train       - `python -m mllm train` on random bins at the default 220M shape (d_model
#                    1024, 16 layers, context 1024, batch 16): warm tokens/s and MFU from
#                    metrics.jsonl
#   4. generate    - decoding the 220M model on the GPU through mllm generate's code: batch 1
#                    with the KV cache and without it, and a batch of 8 through one cache
#   5. summary
# One JSON line per part, printed and appended to OUT_DIR/gpu_check.jsonl; logs beside it.
#
# Usage: benchmarks/gpu_check.sh [OUT_DIR]   (default: $OUT if set, else ./gpu-check)
# Env:   PYTHON (default .venv/bin/python if there, else python3), GPU_CHECK_WHEELS (default
#        .whl/), GPU_CHECK_TRAIN_STEPS (default 40), GPU_CHECK_NEW_TOKENS (default 200).
# Without a GPU (e.g. CUDA_VISIBLE_DEVICES=) the tests skip and parts 3-4 run tiny CPU dry runs,
# marked "dry_run": true, whose figures mean nothing. Exit status 0 when every part passed.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT_DIR=${1:-${OUT:-./gpu-check}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
REPORT=$OUT_DIR/gpu_check.jsonl
: >"$REPORT"
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mllm-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$ROOT/src:$ROOT/tests:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export XDG_CACHE_HOME=$WORK/cache # mllm's remembered peak FLOP/s stays out of the home
STARTED=$(date +%s)
FAILED_PARTS=()

emit() { echo "$1" | tee -a "$REPORT"; }

# part NAME OK(0/1) JSON-FROM-PYTHON RC: the part's line, or a fallback when Python printed none.
part() {
    local name=$1 rc=$2 line=$3
    if [ "$rc" -ne 0 ]; then FAILED_PARTS+=("$name"); fi
    if [ -n "$line" ]; then
        emit "$line"
    else
        emit "{\"part\": \"$name\", \"ok\": false, \"rc\": $rc, \"log\": \"$name.log\"}"
    fi
    if [ "$rc" -ne 0 ] && [ -f "$OUT_DIR/$name.log" ]; then
        echo "--- $name failed (rc $rc); the end of $OUT_DIR/$name.log:" >&2
        tail -n 30 "$OUT_DIR/$name.log" >&2
    fi
}

# --- 1. setup: install what is missing, then check every import the parts need ----------------
installed=0
if ! "$PYTHON" -c "import pydantic" 2>/dev/null; then
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        SITE=$WORK/site
        if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$SITE" "$WHEELS"/*.whl >"$OUT_DIR/setup.log" 2>&1; then
            installed=$(find "$WHEELS" -maxdepth 1 -name '*.whl' | wc -l)
            export PYTHONPATH="$PYTHONPATH:$SITE" # still ahead of site-packages
        fi
    fi
fi
line=$("$PYTHON" - "$installed" "$WHEELS" 2>>"$OUT_DIR/setup.log" <<'PY'
import importlib, json, platform, sys

needed = ["torch", "numpy", "pydantic", "typer", "rich", "tokenizers", "safetensors",
          "pytest", "hypothesis", "httpx", "matplotlib",
          "mllm.config", "mllm.train.loop", "mllm.evaluate", "mllm.serve.engine"]
missing = []
for name in needed:
    try:
        importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - report every failure the same way
        missing.append(f"{name}: {type(error).__name__}: {error}")
report = {"part": "setup", "ok": not missing, "missing": missing,
          "python": platform.python_version(), "wheels_installed": int(sys.argv[1]),
          "wheels_dir": sys.argv[2]}
try:
    import torch
    report["torch"] = torch.__version__
    report["cuda"] = torch.cuda.is_available()
    if report["cuda"]:
        report["gpu"] = torch.cuda.get_device_name(0)
        report["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        report["bf16"] = torch.cuda.is_bf16_supported()
except Exception:  # noqa: BLE001
    pass
print(json.dumps(report))
sys.exit(0 if not missing else 1)
PY
)
rc=$?
part setup "$rc" "$line"
if [ "$rc" -ne 0 ]; then
    echo "setup failed: fill $WHEELS as docs/gpu.md says (missing: see the setup line)" >&2
    exit 1
fi
HAS_GPU=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$HAS_GPU" = 1 ]; then MODE=gpu; else MODE=cpu; fi

# --- 2. pytest -m cuda ------------------------------------------------------------------------
started=$(date +%s)
timeout 210 "$PYTHON" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider \
    --junitxml="$OUT_DIR/cuda_tests.xml" >"$OUT_DIR/cuda_tests.log" 2>&1
rc=$?
tail -n 3 "$OUT_DIR/cuda_tests.log" >&2
line=$("$PYTHON" - "$OUT_DIR/cuda_tests.xml" "$rc" "$(($(date +%s) - started))" <<'PY'
import json, sys
import xml.etree.ElementTree as ET

path, rc, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
suite = ET.parse(path).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
cases = suite.findall("testcase")
def outcome(case):
    for tag in ("failure", "error", "skipped"):
        if case.find(tag) is not None:
            return tag
    return "passed"
counts = {k: 0 for k in ("passed", "failure", "error", "skipped")}
for case in cases:
    counts[outcome(case)] += 1
print(json.dumps({
    "part": "cuda_tests", "ok": rc == 0, "rc": rc, "collected": len(cases),
    "passed": counts["passed"], "failed": counts["failure"], "errors": counts["error"],
    "skipped": counts["skipped"], "seconds": seconds,
    "not_passed": [case.get("name") for case in cases if outcome(case) != "passed"],
    "log": "cuda_tests.log",
}))
PY
)
part cuda_tests "$rc" "$line"

# --- 3. mllm train at the 220M default shape --------------------------------------------------
line=$(timeout 180 "$PYTHON" - "$MODE" "$WORK" "$OUT_DIR" "${GPU_CHECK_TRAIN_STEPS:-40}" \
    2>"$OUT_DIR/train.log" <<'PY'
import json, shutil, statistics, subprocess, sys, time
from pathlib import Path

from bench_train import write_random_data  # random uint16 bins (vocab 16,000) + data.json

mode, work, out, steps = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
if mode == "gpu":  # the default model of mllm train (ModelConfig's defaults), its batch size
    shape = {"context": 1024, "d_model": 1024, "layers": 16, "heads": 16, "batch_size": 16}
    extra, log_interval = ["--device", "cuda"], 10
else:  # a dry run of this part: tiny, and its figures mean nothing
    shape = {"context": 64, "d_model": 64, "layers": 2, "heads": 2, "batch_size": 4}
    extra, log_interval, steps = ["--device", "cpu", "--no-compile"], 2, 6
data_dir, run_dir = write_random_data(work / "data"), work / "run"
args = ["train", "--data-dir", str(data_dir), "--run-dir", str(run_dir)]
for name, value in shape.items():
    args += ["--" + name.replace("_", "-"), str(value)]
args += ["--dropout", "0", "--max-steps", str(steps), "--log-interval", str(log_interval),
         "--eval-interval", str(steps), "--eval-batches", "1", "--ckpt-interval", str(steps),
         "--quiet", *extra]
started = time.perf_counter()
done = subprocess.run([sys.executable, "-m", "mllm", *args], capture_output=True, text=True)
wall = time.perf_counter() - started
sys.stderr.write(done.stdout + done.stderr)
records = []
if (run_dir / "metrics.jsonl").is_file():
    shutil.copyfile(run_dir / "metrics.jsonl", out / "train_metrics.jsonl")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
intervals = [r for r in records if "tokens_per_s" in r]
warm = [r for r in intervals if not r.get("cold")]
report = {"part": "train", "ok": done.returncode == 0 and bool(warm), "rc": done.returncode,
          "dry_run": mode != "gpu",
          "command": "python -m mllm " + " ".join(args).replace(str(data_dir), "DATA")
          .replace(str(run_dir), "RUN")}
if warm:
    report["tokens_per_s"] = round(statistics.median(r["tokens_per_s"] for r in warm), 1)
    mfus = [r["mfu"] for r in warm if r.get("mfu") is not None]
    report["mfu"] = round(statistics.median(mfus), 4) if mfus else None
    report["ms_per_step"] = round(shape["batch_size"] * shape["context"]
                                  / report["tokens_per_s"] * 1e3, 1)
report["intervals"] = [
    {"step": r["step"], "tokens_per_s": round(r["tokens_per_s"], 1), "cold": r.get("cold"),
     "mfu": None if r.get("mfu") is None else round(r["mfu"], 4), "loss": round(r["loss"], 4)}
    for r in intervals]
report["val_loss"] = next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None)
report["wall_s"] = round(wall, 1)
report["shape"] = {**shape, "vocab_size": 16000, "steps": steps}
report["log"] = "train.log"
print(json.dumps(report))
sys.exit(0 if report["ok"] else 1)
PY
)
rc=$?
part train "$rc" "$line"

# --- 4. decoding on the GPU -------------------------------------------------------------------
line=$(timeout 60 "$PYTHON" - "$MODE" "${GPU_CHECK_NEW_TOKENS:-200}" \
    2>"$OUT_DIR/generate.log" <<'PY'
import json, statistics, sys, time

import torch

from bench_generate import CONFIGS, GREEDY, cached_run, median_rate
from mllm.config import ModelConfig
from mllm.decode import Decoder
from mllm.device import DTYPE_NAMES, resolve_decode_dtype, synchronize
from mllm.generate import SampleTiming, timed
from mllm.model import GPT
from mllm.sampling import sample_next

mode, new_tokens = sys.argv[1], int(sys.argv[2])
device = torch.device("cuda" if mode == "gpu" else "cpu")
if mode == "gpu":
    name, config, repeats = "default", CONFIGS["default"], 3
else:  # a dry run of this part: tiny, and its figures mean nothing
    name, repeats, new_tokens = "tiny", 1, 16
    config = ModelConfig(vocab_size=512, context=128, d_model=64, layers=2, heads=2)
dtype = resolve_decode_dtype("auto", device)  # what mllm generate / serve pick here
torch.manual_seed(0)
model = GPT(config).to(device=device, dtype=dtype).eval()
prompt = torch.randint(0, config.vocab_size, (16,)).tolist()


def no_cache_ids(prompt, count):
    """The baseline: the whole sequence through GPT.forward for every token, on the device."""
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    with torch.inference_mode():
        for _ in range(count):
            logits = model(tokens[:, -config.context:], last_only=True)[:, -1]
            token = sample_next(logits, [GREEDY])
            yield int(token[0])
            tokens = torch.cat([tokens, token[:, None]], dim=1)


def no_cache_run():
    timing = SampleTiming(prompt_tokens=len(prompt))
    for _ in timed(no_cache_ids(prompt, new_tokens), timing):
        pass
    return timing


def batch_tokens_per_s(batch):
    """`batch` rows decoded together through one cache, one step per token for all rows."""
    decoder = Decoder(model, batch_size=batch)
    ids = torch.randint(0, config.vocab_size, (batch, 16), device=device)
    synchronize(device)
    started = time.perf_counter()
    logits = decoder.prefill(ids)
    for position in range(16, 16 + new_tokens - 1):
        logits = decoder.step(logits.float().argmax(-1), position)
    synchronize(device)
    return round(batch * new_tokens / (time.perf_counter() - started), 1)


decoder = Decoder(model)
cached_run(decoder, prompt, 8)  # warm-up: allocations, kernel choice
cached = [cached_run(decoder, prompt, new_tokens) for _ in range(repeats)]
baseline = [no_cache_run()]
batch_tokens_per_s(8)  # warm-up
report = {
    "part": "generate", "ok": True, "dry_run": mode != "gpu", "device": str(device),
    "config": name, "params_m": round(model.num_parameters() / 1e6, 1),
    "dtype": DTYPE_NAMES[dtype], "prompt_tokens": len(prompt), "new_tokens": new_tokens,
    "cached_tokens_per_s": median_rate(cached),
    "cached_runs": [round(t.decode_tokens_per_s, 1) for t in cached],
    "prefill_first_token_ms": round(1000 * statistics.median(t.first_token_s for t in cached), 1),
    "no_cache_tokens_per_s": median_rate(baseline),
    "batch8_tokens_per_s": batch_tokens_per_s(8),
    "log": "generate.log",
}
report["speedup"] = round(report["cached_tokens_per_s"] / report["no_cache_tokens_per_s"], 2)
print(json.dumps(report))
PY
)
rc=$?
part generate "$rc" "$line"

# --- 5. summary -------------------------------------------------------------------------------
ok=true
if [ "${#FAILED_PARTS[@]}" -ne 0 ]; then ok=false; fi
failed=""
for name in "${FAILED_PARTS[@]}"; do failed="$failed${failed:+, }\"$name\""; done
emit "{\"part\": \"summary\", \"ok\": $ok, \"mode\": \"$MODE\", \"failed_parts\": [$failed], \"seconds\": $(($(date +%s) - STARTED)), \"report\": \"$REPORT\"}"
[ "$ok" = true ]
