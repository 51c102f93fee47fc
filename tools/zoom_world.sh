#!/usr/bin/env bash
# One-step focus vs multi-turn zoom on the zoom toy world (tools/make_zoom_toy.py: a small shape whose form only
# a second, nested look resolves), after SFT and after GRPO; README "Multi-turn zoom" has the measured table.
#   bash tools/zoom_world.sh     # SEED=0 (the world's; training at the scripts' default seed), OUT=runs/zoom_world
#                                # (replaced); 32 min on 2 CPU cores next to another such run
#   TWO_LOOKS=0.1 bash tools/zoom_world.sh   # a cold start: only 10 % of the zoom SFT traces show the second look
#   TRACE_TILES=any bash tools/zoom_world.sh  # the training traces and boxes look at any tile, not the asked one's
#   TWO_LOOKS=0.1 BETA=0.04 RL_STEPS=120 bash tools/zoom_world.sh   # GRPO's KL weight and steps (default 0.2, 40)
#   ARMS=zoom TWO_LOOKS=0.4 RL_STEPS=120 bash tools/zoom_world.sh   # one arm only (default: focus,zoom)
#   BOX_DECIMALS=3 bash tools/zoom_world.sh  # the SFT box texts' decimals (default 2: in the full view's frame a
#                                            # step is 18 pixels, more than the 12-pixel shape; in a tile's, 4.5)
# The two arms run side by side, one thread each: the focus chain (two-step SFT on the shape's box, then GRPO
# --task focus) and the zoom loop (SFT on the two-look traces, then GRPO --task zoom); same steps and data.
# PYTHON names the interpreter (default python); OUT is replaced only when an earlier run made it (fresh_out.sh).
set -euo pipefail
source "$(dirname "$0")/fresh_out.sh"
OUT=$(absolute_out "${OUT:-}")
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/zoom_world}
SEED=${SEED:-0}
TWO_LOOKS=${TWO_LOOKS:-1}
TRACE_TILES=${TRACE_TILES:-target}
BETA=${BETA:-0.2}
RL_STEPS=${RL_STEPS:-40}
BOX_DECIMALS=${BOX_DECIMALS:-2}
ARMS=${ARMS:-focus,zoom}
for arm in ${ARMS//,/ }; do
    case $arm in focus|zoom) ;; *) echo "ARMS: unknown arm '$arm' (focus, zoom)" >&2; exit 2 ;; esac
done
PY=${PYTHON:-python}
DATA=$OUT/world/data
fresh_out "$OUT"
mkdir -p "$OUT/logs"
T0=$SECONDS
SFT="--finetune full --lr 2e-3 --min_lr_ratio 0.1 --warmup_ratio 0.07 --max_steps 1000 --batch_size 8
     --box_decimals $BOX_DECIMALS"
GRPO="--data $DATA/questions.jsonl --rule_metric exact --finetune full --lr 5e-4 --warmup_ratio 0.15 --beta $BETA
      --max_steps $RL_STEPS --batch_size 8 --num_generations 8 --sample_steps 0"
EVAL="--questions $DATA/test.jsonl --batch_size 64 --rule_metric exact"

echo "=== zoom world (at 0 s) ==="
$PY tools/make_zoom_toy.py --out "$OUT/world" --seed "$SEED" --n_questions 500 --n_test 500 --two_looks "$TWO_LOOKS" \
    --trace_tiles "$TRACE_TILES"

focus() {
    $PY sft.py --model "$OUT/world/qwen2-vl" --data "$DATA/train.jsonl" --output_dir "$OUT/sft_focus" \
        --steps focus,answer $SFT
    $PY eval.py --protocol chain --model "$OUT/sft_focus/final" --max_new_tokens 32 --label "two-step SFT" \
        --out "$OUT/eval/sft_focus.json" $EVAL
    $PY grpo.py --task focus --model "$OUT/sft_focus/final" --output_dir "$OUT/grpo_focus" --max_new_tokens 32 $GRPO
    $PY eval.py --protocol chain --model "$OUT/grpo_focus/final" --max_new_tokens 32 --label "GRPO (focus)" \
        --out "$OUT/eval/grpo_focus.json" $EVAL
}
zoom() {
    $PY sft.py --model "$OUT/world/qwen2-vl" --data "$DATA/train.jsonl" --output_dir "$OUT/sft_zoom" --steps zoom $SFT
    $PY eval.py --protocol zoom --model "$OUT/sft_zoom/final" --max_new_tokens 48 --max_turns 3 --label "zoom SFT" \
        --out "$OUT/eval/sft_zoom.json" $EVAL
    $PY grpo.py --task zoom --model "$OUT/sft_zoom/final" --output_dir "$OUT/grpo_zoom" --max_new_tokens 48 \
        --max_turns 3 --rewards answer,zoom_tool $GRPO
    $PY eval.py --protocol zoom --model "$OUT/grpo_zoom/final" --max_new_tokens 48 --max_turns 3 \
        --label "GRPO (zoom)" --out "$OUT/eval/grpo_zoom.json" $EVAL
}
echo "=== arms $ARMS, side by side (logs: $OUT/logs) ==="
pids=()
for arm in ${ARMS//,/ }; do
    (export OMP_NUM_THREADS=1; $arm > "$OUT/logs/$arm.log" 2>&1) & pids+=($!)
done
trap 'kill "${pids[@]}" 2> /dev/null || true' EXIT  # an arm that failed stops the other, which would run on for minutes
k=0
for arm in ${ARMS//,/ }; do
    wait "${pids[$k]}" || { tail -n 30 "$OUT/logs/$arm.log" >&2; exit 1; }
    k=$((k + 1))
done
trap - EXIT

printf '\nOn %s held-out questions, %d s:\n\n' "$(wc -l < "$DATA/test.jsonl")" $((SECONDS - T0))
E=$OUT/eval
reports=() diffs=()
[[ ,$ARMS, == *,focus,* ]] && reports+=("$E/sft_focus.json" "$E/grpo_focus.json") \
    && diffs+=(--diff "GRPO (focus)" "two-step SFT")
[[ ,$ARMS, == *,zoom,* ]] && reports+=("$E/sft_zoom.json" "$E/grpo_zoom.json") \
    && diffs+=(--diff "GRPO (zoom)" "zoom SFT")
[ ${#reports[@]} = 4 ] && diffs+=(--diff "zoom SFT" "two-step SFT" --diff "GRPO (zoom)" "GRPO (focus)")
$PY tools/compare.py "${reports[@]}" "${diffs[@]}"
