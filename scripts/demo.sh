#!/usr/bin/env bash
# The mllm demo: the whole pipeline at a small scale, in a few minutes on a laptop CPU.
#
#   corpus -> tokenize -> pack -> train -> eval -> generate "Once upon a time"
#
# Usage:  bash scripts/demo.sh [DATA]      (or: make demo [DATA=folder])
#
# Without DATA the corpus streams the default Hugging Face Hub sources. With DATA it reads local
# text instead: each subfolder of DATA is one source named after it (DATA/wikitext,
# DATA/tinystories, ...; READMEs and markdown files in them are skipped). TinyStories-style text
# is weighted up: a small model learns to write simple stories far sooner than encyclopedia prose.
#
# Everything goes to data/demo/ and runs/demo/ (git-ignored, like data/ and runs/). A re-run
# overwrites the data files (each command writes atomically) and replaces runs/demo/, so it
# starts training afresh instead of resuming.
#
# The sizes below are the tuned demo; the environment variables exist so the test suite can run
# the same script in seconds.
set -euo pipefail

PY=${PY:-python}
DATA=${1:-}
DATA_DIR=${DEMO_DATA_DIR:-data/demo}
RUN_DIR=${DEMO_RUN_DIR:-runs/demo}
MAX_LINES=${DEMO_MAX_LINES:-10000}     # documents in corpus.txt
VOCAB=${DEMO_VOCAB:-4096}              # BPE vocabulary
CONTEXT=${DEMO_CONTEXT:-128}
D_MODEL=${DEMO_D_MODEL:-256}
LAYERS=${DEMO_LAYERS:-4}
HEADS=${DEMO_HEADS:-4}
BATCH=${DEMO_BATCH:-8}                 # sequences per step
STEPS=${DEMO_STEPS:-2500}
LR=${DEMO_LR:-3e-3}
TRAIN_SECONDS=${DEMO_TRAIN_SECONDS:-420}  # mllm train --time-budget: the steps that fit, at most STEPS
COMPILE=${DEMO_COMPILE:-1}             # torch.compile: ~20% more tokens/s after ~15 s compiling
NEW_TOKENS=${DEMO_NEW_TOKENS:-120}     # tokens per generated sample
SAMPLES=${DEMO_SAMPLES:-3}
PROMPT=${DEMO_PROMPT:-Once upon a time}
# Mixture weights per source name, by documents; names not listed get weight 1. A WikiText
# article is ~100 times longer than a TinyStories paragraph, so this is still ~20% WikiText by
# bytes (with ../shared/data).
declare -A WEIGHT=([wikitext]=1 [fineweb]=1 [tinystories]=500)

mllm() { "$PY" -m mllm "$@"; }
say() { printf '%s\n' "$*"; }

demo_start=$SECONDS
stage_start=$SECONDS
stage() {
    stage_start=$SECONDS
    say ""
    say "==> $*"
}
stage_done() { say "    ($((SECONDS - stage_start)) s)"; }

# --- the sources ---------------------------------------------------------------------------
sources=()
if [[ -n "$DATA" ]]; then
    if [[ ! -d "$DATA" ]]; then
        say "demo: DATA=$DATA is not a folder (give a folder with one subfolder of text per source)" >&2
        exit 2
    fi
    for dir in "$DATA"/*/; do
        [[ -d "$dir" ]] || continue
        name=$(basename "$dir")
        sources+=(--source "$name=${dir%/}" --ratio "$name=${WEIGHT[$name]:-1}")
    done
    if [[ ${#sources[@]} -eq 0 ]]; then
        say "demo: DATA=$DATA has no subfolders: put each source's text files in DATA/NAME/" >&2
        exit 2
    fi
    for name in wikitext fineweb tinystories; do  # default sources with no folder: left out
        if [[ ! -d "$DATA/$name" ]]; then
            say "demo: DATA=$DATA has no $name/ subfolder: leaving $name out of the mix"
            sources+=(--ratio "$name=0")
        fi
    done
    where="local text in $DATA"
else
    for name in wikitext fineweb tinystories; do
        sources+=(--ratio "$name=${WEIGHT[$name]}")
    done
    where="the Hugging Face Hub (streamed)"
fi

say "mllm demo: up to $MAX_LINES documents from $where -> a ${LAYERS}-layer GPT (d_model $D_MODEL) trained for $STEPS steps"

# --- corpus --------------------------------------------------------------------------------
stage "mllm corpus  (documents from $where -> $DATA_DIR/corpus.txt)"
corpus_log=$(mktemp)
trap 'rm -f "$corpus_log"' EXIT
if ! mllm corpus --data-dir "$DATA_DIR" --max-lines "$MAX_LINES" "${sources[@]}" 2>"$corpus_log"; then
    if [[ -z "$DATA" ]] && grep -q "cannot reach the Hugging Face Hub" "$corpus_log"; then
        say "demo: the Hugging Face Hub cannot be reached; use local text instead: make demo DATA=folder (one subfolder per source: folder/wikitext, folder/fineweb, folder/tinystories; e.g. DATA=../shared/data)" >&2
    else
        cat "$corpus_log" >&2
    fi
    exit 1
fi
cat "$corpus_log" >&2
stage_done

# --- tokenizer and token bins ----------------------------------------------------------------
stage "mllm tokenize  (byte-level BPE, vocab $VOCAB -> $DATA_DIR/tokenizer.json)"
mllm tokenize --data-dir "$DATA_DIR" --vocab-size "$VOCAB"
stage_done

stage "mllm pack  (corpus -> $DATA_DIR/train.bin, val.bin, data.json)"
mllm pack --data-dir "$DATA_DIR" --val-fraction 0.02
stage_done

# --- training ------------------------------------------------------------------------------
stage "mllm train  (-> $RUN_DIR; at most $STEPS steps and $TRAIN_SECONDS s)"
rm -rf "$RUN_DIR"  # the demo's own run: a re-run starts afresh
compile_flag=--no-compile
[[ "$COMPILE" == 1 ]] && compile_flag=--compile
# --time-budget: the run times its first steps, then plans how many fit in the budget (start-up,
# compilation and the final evaluation and checkpoint included), capped by --max-steps; its
# learning rate then decays to --min-lr exactly at its last step, on a slow machine too.
mllm train --data-dir "$DATA_DIR" --run-dir "$RUN_DIR" \
    --context "$CONTEXT" --d-model "$D_MODEL" --layers "$LAYERS" --heads "$HEADS" \
    --batch-size "$BATCH" --max-steps "$STEPS" --time-budget "$TRAIN_SECONDS" \
    --lr "$LR" --min-lr "$(awk "BEGIN { print $LR / 10 }")" \
    --warmup-steps "$(( STEPS / 20 > 0 ? STEPS / 20 : 1 ))" \
    --eval-interval "$STEPS" --ckpt-interval "$STEPS" --log-interval "$(( STEPS / 10 > 0 ? STEPS / 10 : 1 ))" \
    "$compile_flag"
last=$(ls "$RUN_DIR/checkpoints" | grep '^step_' | tail -n 1)
trained=$((10#${last#step_}))
if (( trained < STEPS )); then
    say "    the $TRAIN_SECONDS s time budget fitted $trained of the $STEPS steps (this machine is"
    say "    slower or busier than the demo assumes, so expect rougher text)"
fi
stage_done

# --- evaluation and samples ----------------------------------------------------------------
stage "mllm eval  (loss, perplexity and bits per byte on $DATA_DIR/val.bin)"
mllm eval --run-dir "$RUN_DIR" --data-dir "$DATA_DIR"
stage_done

stage "mllm generate \"$PROMPT\"  ($SAMPLES samples)"
mllm generate "$PROMPT" --run-dir "$RUN_DIR" --num-samples "$SAMPLES" \
    --max-new-tokens "$NEW_TOKENS" --temperature 0.8 --top-k 40 --seed 1
stage_done

# --- where everything went -----------------------------------------------------------------
say ""
say "demo finished in $((SECONDS - demo_start)) s. Where everything went:"
say "  $DATA_DIR/   corpus.txt (+ corpus.json), tokenizer.json, train.bin, val.bin, data.json"
say "  $RUN_DIR/   config.json, metrics.jsonl, loss.png, tokenizer.json, checkpoints/"
if [[ "$PY" == python ]]; then
    say "Try next:"
else
    say "Try next (with the environment active, e.g. source .venv/bin/activate):"
fi
say "  mllm generate \"The little dog\" --run-dir $RUN_DIR --top-k 40"
say "  mllm eval --run-dir $RUN_DIR --data-dir $DATA_DIR --json"
say "  mllm serve --run-dir $RUN_DIR"
