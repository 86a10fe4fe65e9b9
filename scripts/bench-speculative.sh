#!/usr/bin/env bash
# Speculative decoding on SmolLM2-135M-Instruct: acceptance rate and decode tokens/s with and without a
# draft, greedy, 128 new tokens per prompt, 2 threads; checks that every drafted run prints exactly the
# text of the run without a draft. Prints the README's table (markdown).
#
#   cargo build --release -p quant-studio
#   QS=$CARGO_TARGET_DIR/release/quant-studio scripts/bench-speculative.sh
#
# MODELS: the folder holding SmolLM2-135M-Instruct.F16-from-Q4_1.gguf; the drafts (Q4_0, and Q4_0, Q3_K_M and
# Q2_K with the tied embedding — the output matrix — in Q4_0 instead of the mixes' Q8_0: "-head4") and the Q8_0
# model are made there (in spec/) when missing. Both models and drafts run with the default arithmetic
# (llama-cpu); the table's p min is --draft-p-min.
set -euo pipefail
QS=${QS:-${CARGO_TARGET_DIR:-target}/release/quant-studio}
M=${MODELS:-$HOME/.cache/quant-studio/models}
THREADS=${THREADS:-2}
TOKENS=${TOKENS:-128}
F16=$M/SmolLM2-135M-Instruct.F16-from-Q4_1.gguf
OUT=$M/spec
mkdir -p "$OUT"
make() { # make NAME FORMAT [quantize args…]
    local name=$1 format=$2
    shift 2
    [ -f "$OUT/SmolLM2-135M-Instruct.$name.gguf" ] ||
        "$QS" quantize "$F16" --format "$format" "$@" --out "$OUT/SmolLM2-135M-Instruct.$name.gguf" >/dev/null
}
make Q8_0 Q8_0
make Q4_0 Q4_0
for f in Q4_0 Q3_K_M Q2_K; do
    make "$f-head4" "$f" --override 'token_embd.weight=q4_0'
done
Q8=$OUT/SmolLM2-135M-Instruct.Q8_0.gguf
Q40=$OUT/SmolLM2-135M-Instruct.Q4_0.gguf
Q40H=$OUT/SmolLM2-135M-Instruct.Q4_0-head4.gguf
Q3H=$OUT/SmolLM2-135M-Instruct.Q3_K_M-head4.gguf
Q2H=$OUT/SmolLM2-135M-Instruct.Q2_K-head4.gguf
PROMPTS=(
    "Write a detailed essay about the history of the printing press."
    "Explain step by step how to bake bread at home."
    "Describe the water cycle in detail for a school report."
)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# The file's type: F16, Q8_0, Q4_0-head4, …
label() { basename "$1" .gguf | sed -e 's/^SmolLM2-135M-Instruct\.//' -e 's/-from-Q4_1$//'; }

# one TARGET PROMPT [generate args…]: runs once, leaves the output in $TMP/out; sets N, SECS, DRAFTED, ACCEPTED.
one() {
    local target=$1 prompt=$2
    shift 2
    "$QS" --threads "$THREADS" generate "$target" --prompt "$prompt" --max-tokens "$TOKENS" "$@" >"$TMP/out" 2>"$TMP/err"
    local line tps
    line=$(grep '^\[prompt:' "$TMP/err" | tail -1)
    N=$(sed -E 's/.*generated: ([0-9]+) tokens.*/\1/' <<<"$line")
    tps=$(sed -E 's/.*generated: [0-9]+ tokens, ([0-9.]+) tokens\/s.*/\1/' <<<"$line")
    SECS=$(awk -v n="$N" -v t="$tps" 'BEGIN { print n / t }')
    DRAFTED=0 ACCEPTED=0
    if grep -q 'draft:' <<<"$line"; then
        DRAFTED=$(sed -E 's/.*draft: [0-9]+ of ([0-9]+) accepted.*/\1/' <<<"$line")
        ACCEPTED=$(sed -E 's/.*draft: ([0-9]+) of [0-9]+ accepted.*/\1/' <<<"$line")
    fi
}

# run TARGET DRAFT K P_MIN: one table row. Per prompt, the model alone and then with the draft, back to back
# (this machine's speed drifts by tens of percent between minutes, so each row has its own baseline).
run() {
    local target=$1 draft=$2 k=$3 pmin=$4 tokens=0 base=0 spec=0 drafted=0 accepted=0 same=yes
    for p in "${PROMPTS[@]}"; do
        one "$target" "$p"
        base=$(awk -v a="$base" -v b="$SECS" 'BEGIN { print a + b }')
        cp "$TMP/out" "$TMP/base"
        one "$target" "$p" --draft "$draft" --draft-tokens "$k" --draft-p-min "$pmin"
        spec=$(awk -v a="$spec" -v b="$SECS" 'BEGIN { print a + b }')
        cmp -s "$TMP/out" "$TMP/base" || same=NO
        tokens=$((tokens + N))
        drafted=$((drafted + DRAFTED))
        accepted=$((accepted + ACCEPTED))
    done
    local rate
    rate=$(awk -v a="$accepted" -v d="$drafted" 'BEGIN { if (d > 0) printf "%.1f%%", 100 * a / d; else print "–" }')
    echo "| $(label "$target") | $(label "$draft") | $k | $pmin | $rate | $(awk -v n="$tokens" -v s="$base" 'BEGIN { printf "%.1f", n / s }') | $(awk -v n="$tokens" -v s="$spec" 'BEGIN { printf "%.1f", n / s }') | $(awk -v a="$base" -v b="$spec" 'BEGIN { printf "%.2f×", a / b }') | $same |"
}

echo "| model | draft | k | p min | accepted | alone tokens/s | with draft | speed-up | same text |"
echo "|---|---|--:|--:|--:|--:|--:|--:|---|"
for target in "$F16" "$Q8"; do
    for draft in "$Q40" "$Q40H" "$Q3H" "$Q2H"; do
        for k in 2 4; do
            run "$target" "$draft" "$k" 0
        done
    done
    for k in 4 8; do
        for pmin in 0.5 0.8; do
            run "$target" "$Q40" "$k" "$pmin"
        done
    done
done
