#!/usr/bin/env bash
# The whole chain on the built-in toy world (tiny random Qwen2-VL + synthetic grounded VQA), on CPU in minutes,
# in the papers' regime: box annotations do not say where the answer is (SFT's 1000 annotated questions box
# any object of the scene, the asked one or a distractor), question-answer pairs without boxes are plentiful
# (the RL stages see 2000 others, never a box), and every stage is scored on 2000 held-out questions, next to
# two controls that continue SFT for as many steps as the RL stages take (at their rate, and at half of it).
#   bash pipeline.sh            # seed 0; SEED=1 bash pipeline.sh for another world and other training seeds
# Each stage reads the previous stage's files; OUT puts the run elsewhere (default runs/toy, replaced when an
# earlier run made it: tools/fresh_out.sh). PYTHON names the interpreter (default python).
set -euo pipefail
source "$(dirname "$0")/tools/fresh_out.sh"
OUT=$(absolute_out "${OUT:-}")
cd "$(dirname "$0")"
OUT=${OUT:-runs/toy}
SEED=${SEED:-0}
PY=${PYTHON:-python}
WORLD=$OUT/world
DATA=$WORLD/data
RL_STEPS=${RL_STEPS:-300}  # optimizer steps of GRPO (two per batch of rollouts), of DPO stages 1 + 2 together, and of each control
fresh_out "$OUT"  # the run owns OUT: start clean, never resume a previous run's outputs
T0=$SECONDS

stage() {  # stage NAME COMMAND...: a banner, the command, its time. In a lane (LOG set) the command's output
           # goes to the lane's log, and a failure shows the log's last lines.
    local name=$1 start=$SECONDS
    shift
    printf '\n=== %s (at %d:%02d) ===\n' "$name" $(((start - T0) / 60)) $(((start - T0) % 60))
    if [ -n "${LOG:-}" ]; then "$@" >> "$LOG" 2>&1; else "$@"; fi || {
        local rc=$?
        printf '\n!!! %s failed (exit %d) after %d s; the run stops here\n' "$name" $rc $((SECONDS - start)) >&2
        [ -z "${LOG:-}" ] || tail -n 30 "$LOG" >&2
        exit $rc
    }
    printf -- '--- %s: %d s\n' "$name" $((SECONDS - start))
}

lanes() {  # lanes FUNCTION...: independent runs of stages at the same time, one thread each (on 2 cores, two
           # one-thread jobs finish sooner than one two-thread job after the other, with bit-identical results);
           # banners here, each lane's output (progress bars, errors) in $OUT/logs/FUNCTION.log
    local pids=() fn failed=0
    for fn in "$@"; do
        (export LOG=$OUT/logs/$fn.log OMP_NUM_THREADS=1; "$fn") &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    [ $failed = 0 ] || exit 1
}
mkdir -p "$OUT/logs"

# 1. The toy world: models and data from one seed; 2000 test questions, so a paired standard error of the answer
#    score is about one point (the test records come last: the first 1000 are those of a 1000-question world).
#    The distractors are shapes no question names (a cross, a ring): an answer read off a distractor's crop is a
#    guess, as a wrong crop's answer is in VisRL's data, not a correct reading DPO stage 2 would unlearn (README).
stage "toy world" $PY tools/make_toy.py --out "$WORLD" --seed "$SEED" --n_test 2000 --distractors unnamed

# 2. Two-step SFT on the annotated questions: full fine-tuning of the language model, the random vision tower
#    frozen (trained, it collapses its tokens: docs/toy_experiments.md), 2-decimal box text (SPEC section 8).
#    The learning rate decays to 0: stopped at a tenth of it, SFT had not settled, and the RL stages' gains over
#    it were mostly what settling gives (docs/toy_experiments.md).
stage "SFT" $PY sft.py --model "$WORLD/qwen2-vl" --data "$DATA/train.jsonl" --output_dir "$OUT/sft" \
    --finetune full --lr 2e-3 --warmup_ratio 0.07 --max_steps 1000 --batch_size 8 --box_decimals 2 --seed "$SEED"

# 3-5 run in two lanes of about the same length, each stage's evaluation on the 2000 held-out questions (the
# two-step chain, greedy: eval.py runs infer.py's code) in its lane: VisRL's offline branch (pairs, DPO) and one
# control next to GRPO and the other control.
EVAL="$PY eval.py --protocol chain --questions $DATA/test.jsonl --box_format viscot --batch_size 64 --max_new_tokens 32"
# The controls: SFT continued on its own data for as many optimizer steps as each RL stage takes, at the RL stages'
# learning rate (5e-4) and at half of it (at the full rate continued SFT can lose what SFT had). What the RL rows
# gain over both is not more training on SFT's data.
control="--model $OUT/sft/final --data $DATA/train.jsonl --image_root $DATA --finetune full --warmup_ratio 0.05
         --max_steps $RL_STEPS --batch_size 8 --box_decimals 2 --seed $SEED"
offline_rl() {
    # 3. Self-evolution pairs (VisRL) on 600 box-free questions: the SFT model samples boxes and answers (T = 1:
    #    at VisRL's 2 the tiny model's boxes do not parse), the rule judge scores answers by exact match and
    #    crops by what the model answers from the crop alone, and filter_pairs keeps one pair per question.
    head -n 600 "$DATA/questions.jsonl" > "$OUT/pair_questions.jsonl"
    stage "self-evolution candidates" $PY gen_pairs.py --model "$OUT/sft/final" --data "$OUT/pair_questions.jsonl" \
        --image_root "$DATA" --out "$OUT/pairs/candidates.jsonl" --rule_metric exact --box_decimals 2 \
        --max_new_tokens 32 --batch_size 32 --box_temperature 1 --answer_temperature 1 --seed "$SEED"
    stage "filter pairs" $PY filter_pairs.py --candidates "$OUT/pairs/candidates.jsonl" \
        --out "$OUT/pairs/pairs.jsonl"

    # 4. VisRL's preference stages, full fine-tuning from the model each starts from (the reference,
    #    precomputed): stage 1, DPO on the focus box; stage 2, DPO on box and answer; half the RL steps each,
    #    16 pairs a step, at the control's learning rate. The chosen responses' NLL (--sft_weight 3)
    #    keeps DPO from pushing the chosen boxes down with the rejected ones (without it, at the earlier settings,
    #    stage 2 lost 6.6 points: docs/toy_experiments.md). The end-of-turn token stays out of the preference
    #    (--preference_eos exclude): with it in, stage 2 lowered P(end of turn | rejected answer word) until the
    #    model no longer ended its answers after that word (-8.5 points at seed 0, README).
    local dpo="--data $OUT/pairs/pairs.jsonl --image_root $DATA --finetune full --lr 5e-4
               --max_steps $((RL_STEPS / 2)) --batch_size 16 --sft_weight 3 --preference_eos exclude --seed $SEED"
    stage "DPO stage 1" $PY rl_stage1.py --model "$OUT/sft/final" $dpo --output_dir "$OUT/rl1"
    stage "DPO stage 2" $PY rl_stage2.py --model "$OUT/rl1/final" $dpo --output_dir "$OUT/rl2"
    stage "eval: SFT" $EVAL --model "$OUT/sft/final" --label SFT --out "$OUT/eval/sft.json"
    stage "eval: DPO stage 1" $EVAL --model "$OUT/rl1/final" --label "DPO stage 1" --out "$OUT/eval/rl1.json"
    stage "control: SFT continued" $PY sft.py $control --lr 5e-4 --output_dir "$OUT/control"
    stage "eval: control" $EVAL --model "$OUT/control/final" --label control --out "$OUT/eval/control.json"
    stage "eval: DPO stage 2" $EVAL --model "$OUT/rl2/final" --label "DPO stage 2" --out "$OUT/eval/rl2.json"
}

online_rl() {
    # 5. Online GRPO, VisRL's chain as one rollout (--task focus): the SFT model samples a box, answers on its
    #    crop, and the answer alone is the reward (exact match; 0 when the box step does not end: grpo.py's
    #    default, without which seed 0's box steps drifted into text after the box); both steps' tokens are
    #    trained. 8 box-free questions x 8 rollouts per step, each batch used for two updates (--num_iterations 2,
    #    PPO's clipped ratio on the second): half the RL steps of rollouts, as many optimizer steps as the other
    #    stages. The gain grows with the updates and the rollouts (60 steps of 8 x 8 moved nothing; 300 of 8 x 4,
    #    one update each, gained 1.4 to 5.7 points in four worlds, these 150 x 8 x 2 at lr 3e-4 3.6 to 7.0 in a
    #    minute more, and at 5e-4 on another machine 2.3 to 14.1: docs/toy_experiments.md). lr 5e-4, the DPO
    #    stages' and the control's (with one update per batch, at 5e-4 one world of four lost its box format,
    #    another's boxes slid off their objects: docs/toy_experiments.md); KL weight 0.2 (at 0.04 and lr 1e-3
    #    runs lost the box format).
    stage "GRPO (focus)" $PY grpo.py --task focus --model "$OUT/sft/final" --data "$DATA/questions.jsonl" \
        --image_root "$DATA" --output_dir "$OUT/grpo" --rule_metric exact --finetune full --lr 5e-4 \
        --warmup_ratio 0.05 --beta 0.2 --max_steps $((RL_STEPS / 2)) --num_iterations 2 --batch_size 8 \
        --num_generations 8 --max_new_tokens 32 --seed "$SEED"

    stage "eval: GRPO" $EVAL --model "$OUT/grpo/final" --label "GRPO (focus)" --out "$OUT/eval/grpo.json"
    stage "control at half the rate" $PY sft.py $control --lr 2.5e-4 --output_dir "$OUT/control_half"
    stage "eval: control at half the rate" $EVAL --model "$OUT/control_half/final" --label "control (half lr)" \
        --out "$OUT/eval/control_half.json"
}
lanes offline_rl online_rl

# 6. One table, and each RL row's paired difference (same questions) from its start, SFT and both controls.
printf '\nThe two-step chain on %s held-out questions (box_acc: IoU > 0.5 with the annotated box; answer_score: exact match);\n' \
    "$(wc -l < "$DATA/test.jsonl")"
printf 'paired differences: mean per-question difference ± its standard error. Whole run: %d s (logs: %s).\n\n' \
    $((SECONDS - T0)) "$OUT/logs"
E=$OUT/eval
$PY tools/compare.py "$E/sft.json" "$E/control.json" "$E/control_half.json" "$E/rl1.json" "$E/rl2.json" \
    "$E/grpo.json" --diff control SFT --diff "control (half lr)" SFT --diff "DPO stage 1" SFT \
    --diff "DPO stage 2" "DPO stage 1" --diff "DPO stage 2" SFT --diff "DPO stage 2" control \
    --diff "DPO stage 2" "control (half lr)" --diff "GRPO (focus)" SFT --diff "GRPO (focus)" control \
    --diff "GRPO (focus)" "control (half lr)"
