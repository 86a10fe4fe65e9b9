#!/usr/bin/env bash
# The GPU backend's numbers on a random-weight Llama-3-8B-shaped model (the README's "The GPU backend" and
# issue 11's bar): GEMM GFLOP/s, pp512 and tg128 tokens/s of F16 and Q4_K_M, decoding bandwidth (weight
# bytes per token × tokens/s), perplexity tokens/s on the GPU against the CPU on 2 threads, GPTQ seconds
# for one linear (× 7 ≈ a layer), dequantisation GB/s. Prints what it measured and writes it under OUT.
#
# Built here, run on a machine with a GPU (one prepared script: a lent machine's time is short):
#   cargo build --release -p quant-studio --example fixture
#   mkdir -p .gpu && cp $CARGO_TARGET_DIR/release/quant-studio $CARGO_TARGET_DIR/release/examples/fixture .gpu/
#   BIN=.gpu OUT=$OUT scripts/gpu-numbers.sh          (carry .gpu; on lavapipe: LAYERS=1 HIDDEN=256 …)
#
# LAYERS (default 32) shortens the model without changing a layer's shapes: per-token bandwidth is computed
# from the file's own weight bytes, so fewer layers give the same GB/s sooner (the GPTQ line is per linear).
set -euo pipefail
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
QS=$BIN/quant-studio
OUT=${OUT:-/tmp/gpu-numbers}
WORK=${WORK:-/tmp/gpu-numbers-models}
LAYERS=${LAYERS:-32}
HIDDEN=${HIDDEN:-4096}
INTER=${INTER:-14336}
HEADS=${HEADS:-32}
KV=${KV:-8}
CHUNKS=${CHUNKS:-4}
mkdir -p "$OUT" "$WORK"
log() { echo "$*" | tee -a "$OUT/summary.txt"; }
: >"$OUT/summary.txt"
"$QS" gpus | tee -a "$OUT/summary.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv 2>/dev/null | tee -a "$OUT/summary.txt" || true
t0=$(date +%s)
"$BIN/fixture" "$WORK/src" --hidden "$HIDDEN" --intermediate "$INTER" --layers "$LAYERS" --heads "$HEADS" \
    --kv-heads "$KV" --dtype bf16 >/dev/null
"$QS" quantize "$WORK/src" --format f16 --out "$WORK/f16.gguf" >/dev/null
"$QS" quantize "$WORK/f16.gguf" --format q4_k_m --out "$WORK/q4km.gguf" >/dev/null
rm -rf "$WORK/src"
log "models made in $(($(date +%s) - t0)) s: $LAYERS layers of hidden $HIDDEN, intermediate $INTER"
for f in f16 q4km; do
    bytes=$(stat -c %s "$WORK/$f.gguf")
    log "== $f ($bytes bytes; the fixture's 384-token vocabulary makes the file ≈ the bytes a token reads)"
    "$QS" --backend gpu bench "$WORK/$f.gguf" -p 512 -n 128 -r 2 2>&1 | tee "$OUT/bench-$f.txt" | tee -a "$OUT/summary.txt"
    tg=$(awk -F'|' '/tg128/ {split($4, a, "±"); gsub(/ /, "", a[1]); print a[1]}' "$OUT/bench-$f.txt")
    log "decoding: $(awk -v b="$bytes" -v t="$tg" 'BEGIN {printf "%.1f GB/s", b * t / 1e9}') ($tg tokens/s)"
    "$QS" --backend gpu eval "$WORK/$f.gguf" --chunks "$CHUNKS" 2>&1 | grep -E "tokens/s|PPL" | tee -a "$OUT/summary.txt"
done
log "== CPU, 2 threads (perplexity tokens/s, the GPU's ratio against it)"
RAYON_NUM_THREADS=2 "$QS" --backend cpu eval "$WORK/f16.gguf" --chunks 1 2>&1 | grep -E "tokens/s|PPL" | tee -a "$OUT/summary.txt"
log "total $(($(date +%s) - t0)) s"
