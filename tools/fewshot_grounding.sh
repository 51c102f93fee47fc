#!/usr/bin/env bash
# Visual-RFT's few-shot claim on the toy world: from a model SFT'd on a few box-annotated examples, GRPO with
# a verifiable box reward on the same examples generalises to held-out images better than SFT trained on them
# for as many more steps. Grounding only (the focus step: question -> the target's box), scored on 4000
# held-out images (at 1000 one paired SE was about a point, as large as the effect). README has the table.
#   bash tools/fewshot_grounding.sh        # SHOTS=32 SEED=0 by default; OUT=runs/fewshot (replaced); ~3 min
# PYTHON names the interpreter (default python); OUT is replaced only when an earlier run made it (fresh_out.sh).
set -euo pipefail
source "$(dirname "$0")/fresh_out.sh"
OUT=$(absolute_out "${OUT:-}")
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/fewshot}
SEED=${SEED:-0}               # the world and the few-shot SFT
RUN_SEED=${RUN_SEED:-$SEED}  # the two arms' batches and samples (README's "run seed 7" rows: RUN_SEED=7)
SHOTS=${SHOTS:-32}
N_TEST=${N_TEST:-4000}       # held-out images; the first 1000 are the same at any N_TEST
SFT_STEPS=${SFT_STEPS:-200}  # the few-shot SFT model both arms start from (after 50 steps more SFT still helps)
RL_STEPS=${RL_STEPS:-120}    # GRPO steps, and the control's extra SFT steps
RL_LR=${RL_LR:-2.5e-4}       # both arms' learning rate (GRPO at 5e-4 lost the boxes, at 1e-4 barely moved: README)
BETA=${BETA:-0.2}            # GRPO's KL weight
PY=${PYTHON:-python}
DATA=$OUT/world/data
fresh_out "$OUT"
T0=$SECONDS
banner() { printf '\n=== %s (at %d s) ===\n' "$1" $((SECONDS - T0)); }

banner "toy world: $SHOTS annotated examples (the target's box), $N_TEST held-out"
$PY tools/make_toy.py --out "$OUT/world" --seed "$SEED" --n_train "$SHOTS" --train_boxes target --n_test "$N_TEST"

banner "few-shot SFT: the box step, $SFT_STEPS steps"
$PY sft.py --model "$OUT/world/qwen2-vl" --data "$DATA/train.jsonl" --output_dir "$OUT/sft" --steps focus \
    --finetune full --lr 2e-3 --min_lr_ratio 0.1 --warmup_ratio 0.07 --max_steps "$SFT_STEPS" --batch_size 8 \
    --box_decimals 2 --seed "$SEED"

banner "control: SFT continued on the same examples, $RL_STEPS steps"
$PY sft.py --model "$OUT/sft/final" --data "$DATA/train.jsonl" --image_root "$DATA" --output_dir "$OUT/control" \
    --steps focus --finetune full --lr "$RL_LR" --warmup_ratio 0.15 --max_steps "$RL_STEPS" --batch_size 8 \
    --box_decimals 2 --seed "$RUN_SEED"

banner "GRPO (grounding, IoU reward) on the same examples, $RL_STEPS steps"
$PY grpo.py --task grounding --rewards grounding_iou --model "$OUT/sft/final" --data "$DATA/train.jsonl" \
    --image_root "$DATA" --output_dir "$OUT/grpo" --finetune full --lr "$RL_LR" --warmup_ratio 0.15 --beta "$BETA" \
    --max_steps "$RL_STEPS" --batch_size 8 --num_generations 8 --max_new_tokens 32 --seed "$RUN_SEED"

EVAL="$PY eval.py --protocol grounding --questions $DATA/test.jsonl --box_format viscot --batch_size 64 --max_new_tokens 32"
for run in sft control grpo; do
    banner "eval: $run"
    $EVAL --model "$OUT/$run/final" --label "$run" --out "$OUT/eval/$run.json"
done

printf '\nGrounding on %s held-out images after %s-shot SFT (box_acc: IoU > 0.5; paired differences ± SE). %d s.\n\n' \
    "$(wc -l < "$DATA/test.jsonl")" "$SHOTS" $((SECONDS - T0))
$PY tools/compare.py "$OUT/eval/sft.json" "$OUT/eval/control.json" "$OUT/eval/grpo.json" \
    --diff control sft --diff grpo sft --diff grpo control
