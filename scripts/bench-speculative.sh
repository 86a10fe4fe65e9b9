#!/usr/bin/env bash
# Speculative decoding on SmolLM2-135M-Instruct: acceptance rate and decode tokens/s with and without a
# draft, greedy, 128 new tokens per prompt, 2 threads; checks that every drafted run prints exactly the
# text of the run without a draft. Prints the README's table (markdown).
#
#   cargo build --release -p quant-studio
#   QS=$CARGO_TARGET_DIR/release/quant-studio scripts/bench-speculative.sh
#
# MODELS: the folder holding SmolLM2-135M-Instruct.F16-from-Q4_1.gguf (and its -quants/ folder with Q3_K_M);
# the Q8_0, Q4_0 and Q2_K files are made there (in spec/) when missing.
set -euo pipefail
QS=${QS:-${CARGO_TARGET_DIR:-target}/release/quant-studio}
M=${MODELS:-$HOME/.cache/quant-studio/models}
THREADS=${THREADS:-2}
TOKENS=${TOKENS:-128}
F16=$M/SmolLM2-135M-Instruct.F16-from-Q4_1.gguf
Q3KM=$M/SmolLM2-135M-Instruct.F16-from-Q4_1-quants/SmolLM2-135M-Instruct.F16-from-Q4_1-Q3_K_M.gguf
OUT=$M/spec
mkdir -p "$OUT"
for f in Q8_0 Q4_0 Q2_K; do
    [ -f "$OUT/SmolLM2-135M-Instruct.$f.gguf" ] ||
        "$QS" quantize "$F16" --format "$f" --out "$OUT/SmolLM2-135M-Instruct.$f.gguf" >/dev/null
done
Q8=$OUT/SmolLM2-135M-Instruct.Q8_0.gguf
Q40=$OUT/SmolLM2-135M-Instruct.Q4_0.gguf
Q2K=$OUT/SmolLM2-135M-Instruct.Q2_K.gguf
PROMPTS=(
    "Write a detailed essay about the history of the printing press."
    "Explain step by step how to bake bread at home."
    "Describe the water cycle in detail for a school report."
)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# run TARGET DRAFT K NUMERICS: one table row (DRAFT "-" = none).
run() {
    local target=$1 draft=$2 k=$3 numerics=$4 tokens=0 secs=0 drafted=0 accepted=0 same=yes i=0
    for p in "${PROMPTS[@]}"; do
        i=$((i + 1))
        local args=(--threads "$THREADS" generate "$target" --prompt "$p" --max-tokens "$TOKENS" --numerics "${TARGET_NUMERICS:-exact}")
        if [ "$draft" != - ]; then
            args+=(--draft "$draft" --draft-tokens "$k" --draft-numerics "$numerics")
        fi
        "$QS" "${args[@]}" >"$TMP/out" 2>"$TMP/err"
        local line
        line=$(grep '^\[prompt:' "$TMP/err" | tail -1)
        local n tps
        n=$(sed -E 's/.*generated: ([0-9]+) tokens.*/\1/' <<<"$line")
        tps=$(sed -E 's/.*generated: [0-9]+ tokens, ([0-9.]+) tokens\/s.*/\1/' <<<"$line")
        tokens=$((tokens + n))
        secs=$(awk -v s="$secs" -v n="$n" -v t="$tps" 'BEGIN { print s + n / t }')
        if [ "$draft" = - ]; then
            cp "$TMP/out" "$TMP/base-$(basename "$target")-$i"
        else
            cmp -s "$TMP/out" "$TMP/base-$(basename "$target")-$i" || same=NO
            drafted=$((drafted + $(sed -E 's/.*draft: [0-9]+ of ([0-9]+) accepted.*/\1/' <<<"$line")))
            accepted=$((accepted + $(sed -E 's/.*draft: ([0-9]+) of [0-9]+ accepted.*/\1/' <<<"$line")))
        fi
    done
    local tps rate
    tps=$(awk -v n="$tokens" -v s="$secs" 'BEGIN { printf "%.1f", n / s }')
    if [ "$draft" = - ]; then
        BASE=$tps
        echo "| $(basename "$target" .gguf) | none | – | – | $tps | 1.00× | – |"
    else
        rate=$(awk -v a="$accepted" -v d="$drafted" 'BEGIN { printf "%.1f%%", 100 * a / d }')
        echo "| $(basename "$target" .gguf) | $(basename "$draft" .gguf | sed 's/.*[-.]//') ($numerics) | $k | $rate | $tps | $(awk -v t="$tps" -v b="$BASE" 'BEGIN { printf "%.2f×", t / b }') | $same |"
    fi
}

echo "| target | draft (draft numerics) | k | accepted | decode tokens/s | vs no draft | same text |"
echo "|---|---|--:|--:|--:|--:|---|"
for target in "$F16" "$Q8"; do
    run "$target" - 0 exact
    for k in 2 4 6; do
        run "$target" "$Q40" "$k" llama-cpu
    done
    for draft in "$Q40" "$Q3KM" "$Q2K"; do
        run "$target" "$draft" 4 exact
    done
done
