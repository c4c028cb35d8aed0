#!/usr/bin/env bash
# The outputs of the pipeline that are deterministic today, written by the mllm source in SRC_DIR
# into OUT_DIR, for a refactor to compare byte for byte (issue 9 was checked this way):
#
#   git worktree add /tmp/before HEAD~5
#   bash scripts/deterministic_outputs.sh /tmp/before/src /tmp/out-before
#   bash scripts/deterministic_outputs.sh src /tmp/out-after
#   diff -r --exclude=data --exclude=runs /tmp/out-before /tmp/out-after && echo identical
#
# Compared: corpus.txt, tokenizer.json, the bins (sha256), data.json less its timestamps,
# uncompiled training losses (fp32 and bf16), eval's numbers, greedy and seeded generation in
# fp32 and bf16, and a generation that slides the context window. Needs ../shared/data.
set -euo pipefail
SRC=$(realpath "$1"); OUT=$2
REPO=$(cd "$(dirname "$0")/.." && pwd)
DATA=${DATA:-$REPO/../shared/data}
PY=${PY:-$(bash "$REPO/setup_env.sh" --print-python)}
rm -rf "$OUT"; mkdir -p "$OUT"; cd "$OUT"
export PYTHONPATH=$SRC HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
M="$PY -m mllm"
TINY=(--context 64 --d-model 64 --layers 2 --heads 4 --batch-size 8 --lr 3e-3 --warmup-steps 20
      --log-interval 10 --eval-interval 30 --eval-batches 2 --no-compile -q)
$M corpus --source wikitext="$DATA/wikitext" --source tinystories="$DATA/tinystories" \
  --ratio fineweb=0 --max-lines 3000 -q
$M tokenize --vocab-size 2000 -q
$M pack -q
$M train "${TINY[@]}" --max-steps 200
$M train "${TINY[@]}" --max-steps 60 --run-dir runs/bf16 --dtype bf16
$M eval --json > eval.json
$M eval --json --dtype fp32 > eval_fp32.json
$M eval --json --run-dir runs/bf16 > eval_bf16.json
for dtype in fp32 bf16; do
  $M generate "Once upon a time" --temperature 0 --max-new-tokens 100 --dtype $dtype -q > gen_$dtype.txt
  $M generate "The" --temperature 0.9 --top-k 40 --seed 3 --num-samples 2 --max-new-tokens 80 \
    --dtype $dtype -q > gen_seeded_$dtype.txt
done
$M generate "It was" --temperature 0 --max-new-tokens 150 --dtype fp32 -q > gen_slide_fp32.txt
"$PY" - <<'PY'
import json

def keep(path, keys):
    return [{k: r[k] for k in keys if k in r} for r in map(json.loads, open(path))]

meta = json.load(open("data/data.json"))
for key in ("created_at", "seconds"):
    meta.pop(key, None)
meta["corpus"]["sidecar"].pop("sha256", None)  # corpus.json holds its own timestamp
json.dump(meta, open("data_json.json", "w"), indent=1, sort_keys=True)
for run in ("default", "bf16"):
    losses = keep(f"runs/{run}/metrics.jsonl", ("step", "loss", "val_loss", "grad_norm", "lr"))
    json.dump(losses, open(f"losses_{run}.json", "w"), indent=1)
for name in ("eval", "eval_fp32", "eval_bf16"):
    result = json.load(open(f"{name}.json"))
    result.pop("checkpoint")
    json.dump(result, open(f"{name}.json", "w"), sort_keys=True)
PY
sha256sum data/corpus.txt data/tokenizer.json data/train.bin data/val.bin > hashes.txt
