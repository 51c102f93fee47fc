#!/usr/bin/env bash
# The whole chain on the built-in toy world (tiny random Qwen2-VL + synthetic grounded VQA), on CPU in
# minutes. Each stage reads the previous stage's files; set OUT to put the run elsewhere.
#   bash pipeline.sh    # toy world -> SFT -> self-evolution pairs -> DPO stage 1 -> stage 2; GRPO -> eval table
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-runs/toy}
PY=${PYTHON:-python}
WORLD=$OUT/world
BASE=$WORLD/qwen2-vl
rm -rf "$OUT"  # the run owns OUT: start clean, never resume a previous run's outputs

# 1. The toy world: models and data from one seed.
$PY tools/make_toy.py --out "$WORLD" --seed 0

# 2. Two-step SFT. From-scratch weights need full fine-tuning (vision tower included), a high lr and
#    2-decimal box text (3 decimals do not learn at this size: SPEC section 8).
$PY sft.py --model "$BASE" --data "$WORLD/data/train.jsonl" --output_dir "$OUT/sft" \
    --finetune full --train_vision --lr 2e-3 --min_lr_ratio 0.1 --warmup_ratio 0.07 --epochs 3 \
    --batch_size 16 --box_decimals 2

# 3. Self-evolution pairs (VisRL): the SFT model samples boxes and answers on 1000 training questions, the
#    rule judge scores them without looking at the annotated boxes (--ignore_bbox: as on box-free data),
#    and filter_pairs keeps one chosen/rejected pair per question with a clear winner. Sampling at T = 1, not
#    VisRL's 2: at 2 the tiny model's boxes are 99 % unparsable.
head -n 1000 "$WORLD/data/train.jsonl" > "$OUT/pair_questions.jsonl"
$PY gen_pairs.py --model "$OUT/sft/final" --data "$OUT/pair_questions.jsonl" --image_root "$WORLD/data" \
    --out "$OUT/pairs/candidates.jsonl" --ignore_bbox --box_decimals 2 --max_new_tokens 24 --batch_size 16 \
    --box_temperature 1 --answer_temperature 1 2>/dev/null
$PY filter_pairs.py --candidates "$OUT/pairs/candidates.jsonl" --out "$OUT/pairs/pairs.jsonl" \
    --grpo_out "$OUT/pairs/grpo_prompts.jsonl"

# 4. VisRL's preference stages, LoRA on the merged model each starts from (the reference is that model):
#    stage 1, DPO on the focus box; merge; stage 2, DPO on box and answer; merge. lr 1e-3 and 2 epochs for
#    a 2M-parameter model (VisRL: 5e-6, 5 epochs, 7B); a tenth of the pairs held out for the metrics.
DPO="--image_root $WORLD/data --data $OUT/pairs/pairs.jsonl --finetune lora --lr 1e-3 --epochs 2 --batch_size 8"
$PY rl_stage1.py --model "$OUT/sft/final" $DPO --output_dir "$OUT/rl1" 2>/dev/null
$PY merge.py --model "$OUT/sft/final" --adapter "$OUT/rl1/final" --out "$OUT/rl1_merged" 2>/dev/null
$PY rl_stage2.py --model "$OUT/rl1_merged" $DPO --output_dir "$OUT/rl2" 2>/dev/null
$PY merge.py --model "$OUT/rl1_merged" --adapter "$OUT/rl2/final" --out "$OUT/rl2_merged" 2>/dev/null

# 5. Online GRPO, VisRL's chain as one rollout (--task focus): the SFT model samples a box, answers on its
#    crop, and the answer alone is the reward (exact match); both steps' tokens are trained. Full fine-tuning
#    from the SFT model (as SFT), 8 questions x 8 rollouts per step, on the questions filter_pairs.py wrote as
#    GRPO prompts.
$PY grpo.py --task focus --model "$OUT/sft/final" --data "$OUT/pairs/grpo_prompts.jsonl" --image_root "$WORLD/data" \
    --output_dir "$OUT/grpo" --rule_metric exact --finetune full --lr 3e-4 --max_steps 100 --batch_size 8 \
    --num_generations 8 --max_new_tokens 32 2>/dev/null

# 6. Evaluate every stage: the two-step chain, greedy, on the held-out split (eval.py runs infer.py's code).
EVAL="$PY eval.py --protocol chain --questions $WORLD/data/test.jsonl --box_format viscot --batch_size 32"
$EVAL --model "$BASE" --label untrained --out "$OUT/eval/untrained.json" > /dev/null 2>&1
$EVAL --model "$OUT/sft/final" --label SFT --out "$OUT/eval/sft.json" > /dev/null 2>&1
$EVAL --model "$OUT/rl1_merged" --label "DPO stage 1" --out "$OUT/eval/rl1.json" > /dev/null 2>&1
$EVAL --model "$OUT/rl2_merged" --label "DPO stage 2" --out "$OUT/eval/rl2.json" > /dev/null 2>&1
$EVAL --model "$OUT/grpo/final" --label "GRPO (focus)" --out "$OUT/eval/grpo.json" > /dev/null 2>&1
echo
$PY tools/compare.py "$OUT/eval/untrained.json" "$OUT/eval/sft.json" "$OUT/eval/rl1.json" "$OUT/eval/rl2.json" \
    "$OUT/eval/grpo.json"
