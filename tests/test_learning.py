"""Learning, in pipeline.sh's regime: SFT on annotated records whose boxes do not say where the answer is (in
a scene with distractors the box is any of its objects), then RL on questions without boxes. One shared SFT
fixture, the pipeline's SFT run. Every RL claim is a held-out measure that must clear 0 by a number of its own
standard errors (DPO: the preference margin on held-out pairs; GRPO: the policy gain of tools/policy_gain.py on
held-out questions), and is checked against a broken counterpart (the preference or the advantage with its
sign flipped) that must miss the same bar. The bars are sized by the values measured across perturbed runs
(LEARNING_SEED=1: another world and training seed; other RL seeds) and machines: README, "Learning tests"."""
import json
import os
import sys

import pytest
from conftest import ROOT, run_script

import common
import eval as evaluate
import gen_pairs
import grpo
import rl_stage1
from tools import compare, policy_gain

SFT_FLAGS = ["--finetune", "full", "--lr", "2e-3", "--min_lr_ratio", "0.1", "--warmup_ratio", "0.07",
             "--max_steps", "1000", "--batch_size", "8", "--box_decimals", "2"]
HELD_OUT = 300  # test questions the SFT chain is scored on
SEED = os.environ.get("LEARNING_SEED", "0")  # the world's and every run's seed


def chain_eval(model, world, out, n):
    """What pipeline.sh runs after each stage: eval.py's chain protocol (infer, then score), on the first n
    test questions. Returns (report, per-question items)."""
    questions = str(out) + ".questions.jsonl"
    common.write_jsonl(questions, common.read_jsonl(str(world / "data" / "test.jsonl"))[:n])
    evaluate.main(["--protocol", "chain", "--questions", questions, "--image_root", str(world / "data"),
                   "--model", str(model), "--out", str(out), "--batch_size", "64", "--max_new_tokens", "32"])
    return compare.read_report(str(out))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    run_script(sys.executable, os.path.join(ROOT, "tools", "make_toy.py"), "--out", str(out), "--seed", SEED)
    return out


@pytest.fixture(scope="module")
def sft(world, tmp_path_factory):
    """The pipeline's SFT run, and its chain on the held-out questions (the RL tests' starting point)."""
    out = tmp_path_factory.mktemp("sft")
    run_script(sys.executable, os.path.join(ROOT, "sft.py"), "--model", str(world / "qwen2-vl"),
               "--data", str(world / "data" / "train.jsonl"), "--output_dir", str(out), *SFT_FLAGS, "--seed", SEED)
    return out, chain_eval(out / "final", world, out / "eval.json", HELD_OUT)


def test_sft_learns_to_find_objects_and_read_crops(world, sft, tmp_path):
    out, (after, items) = sft
    before, _ = chain_eval(world / "qwen2-vl", world, tmp_path / "untrained.json", 200)
    print(f"untrained {before['mean']}\nSFT {after['mean']}")
    assert before["parseable"] <= 0.1 and after["parseable"] >= 0.95
    # Alone in the picture, the target is found and its shape read off the crop (measured 0.98-1.0: the
    # training boxes of one-object scenes are the target's); chance is 1/12 for the box, 1/3 for the answer.
    objects = {r["id"]: r["objects"] for r in common.read_jsonl(str(world / "data" / "test.jsonl"))}
    alone = [it for it in items.values() if objects[it["id"]] == 1]
    box_alone = sum(it["iou"] > 0.5 for it in alone) / len(alone)
    answer_alone = sum(it["answer_score"] for it in alone) / len(alone)
    print(f"one-object questions: {len(alone)}, box acc {box_alone:.3f}, answer {answer_alone:.3f}")
    assert box_alone >= 0.9 and answer_alone >= 0.9
    with open(out / "metrics.jsonl") as f:
        loss = [json.loads(line)["loss"] for line in f]
    assert loss[0] > 4 and sum(loss[-50:]) / 50 < 0.3


@pytest.fixture(scope="module")
def pairs(world, sft, tmp_path_factory):
    """gen_pairs (rule judge: exact match; crops judged by the answer from the crop alone) -> filter_pairs on
    384 box-free questions, with pipeline.sh's settings (it takes 600 questions)."""
    out = tmp_path_factory.mktemp("pairs")
    common.write_jsonl(str(out / "q.jsonl"), common.read_jsonl(str(world / "data" / "questions.jsonl"))[:384])
    gen_pairs.main(["--model", str(sft[0] / "final"), "--data", str(out / "q.jsonl"), "--image_root",
                    str(world / "data"), "--out", str(out / "cands.jsonl"), "--rule_metric", "exact",
                    "--box_decimals", "2", "--max_new_tokens", "32", "--batch_size", "32", "--box_temperature", "1",
                    "--answer_temperature", "1"])
    table = run_script(sys.executable, os.path.join(ROOT, "filter_pairs.py"), "--candidates",
                       str(out / "cands.jsonl"), "--out", str(out / "pairs.jsonl")).stdout
    print(table)
    return out


def test_self_evolution_pairs_prefer_the_target(world, pairs):
    """The chosen boxes must be on the target far more often than the rejected ones. Nothing upstream saw the
    target's box (the questions have none, SFT's boxes are any object's): this is what the answer reward
    carries."""
    with open(world / "data" / "target_boxes.json") as f:
        truth = json.load(f)
    rows = common.read_jsonl(str(pairs / "pairs.jsonl"))
    assert len(rows) >= 150  # measured 229 and 248 of 384

    def on_target(box, target):
        return box is not None and gen_pairs.coverage(box, target) >= 0.5

    chosen = sum(on_target(p["chosen_box"], truth[p["id"]]) for p in rows) / len(rows)
    rejected = sum(on_target(p["rejected_box"], truth[p["id"]]) for p in rows) / len(rows)
    print(f"{len(rows)} pairs; chosen box on the target {chosen:.2f}, rejected {rejected:.2f}")
    # Measured 0.64-0.88 and 0.00 over worlds and machines (README); all candidates' boxes are on the target 27-28 %
    # of the time (pipeline.sh, both seeds), so 0.6 is far above what a reward blind to it would give.
    assert chosen >= 0.6 and rejected <= 0.1


def dpo_run(world, sft, pairs, out):
    """DPO stage 1 at a CI size (60 steps of 8 pairs, lr 2e-4, full fine-tuning, the chosen NLL on; pipeline.sh
    takes 16 pairs a step at lr 5e-4 with the NLL at weight 3), a quarter of the pairs held out; returns their
    preference accuracy, margin and the margin's standard error at the end (at the start policy = reference:
    0, 0 and 0)."""
    rl_stage1.run(["--model", str(sft[0] / "final"), "--data", str(pairs / "pairs.jsonl"), "--image_root",
                   str(world / "data"), "--output_dir", str(out), "--finetune", "full", "--lr", "2e-4",
                   "--max_steps", "60", "--batch_size", "8", "--sft_weight", "1", "--eval_fraction", "0.25",
                   "--seed", SEED])
    end = [r for r in common.read_jsonl(str(out / "metrics.jsonl")) if "eval_box/accuracy" in r][-1]
    return end["eval_box/accuracy"], end["eval_box/margin"], end["eval_box/margin_se"]


# Held-out preference accuracy and margin (measured 0.66-0.76 / 0.55-1.48 over two worlds and two DPO seeds; flipped
# 0.31-0.36 / -0.50 and -1.76), and the margin in its own standard errors (measured 3.5 to 5.6; flipped -4.1 and
# -6.0): README "Learning tests".
DPO_ACCURACY, DPO_MARGIN, DPO_T = 0.6, 0.3, 2.0


def test_dpo_learns_held_out_preferences_and_a_flipped_preference_does_not(world, sft, pairs, tmp_path,
                                                                           monkeypatch):
    """Stage 1 on the self-evolution pairs: on pairs it never trained on, the policy prefers the chosen box
    (the one the answer reward found, mostly the target's) over the rejected one, by a margin beyond its
    noise; the same run with the preference's sign flipped (a broken loop a reader could write) does not."""
    accuracy, margin, se = dpo_run(world, sft, pairs, tmp_path / "dpo")
    print(f"DPO stage 1: held-out preference accuracy {accuracy:.3f}, margin {margin:.3f} ± {se:.3f}")
    original = rl_stage1.dpo_loss

    def flipped(*a, **kw):
        pc, pr, ref_c, ref_r = a[:4]
        _, rc, rr = original(*a, **kw)
        return original(pr, pc, ref_r, ref_c, *a[4:], **kw)[0], rc, rr

    monkeypatch.setattr(rl_stage1, "dpo_loss", flipped)
    broken_accuracy, broken_margin, broken_se = dpo_run(world, sft, pairs, tmp_path / "flipped")
    print(f"flipped preference: held-out preference accuracy {broken_accuracy:.3f}, margin {broken_margin:.3f} ± "
          f"{broken_se:.3f}")
    assert accuracy >= DPO_ACCURACY and margin >= DPO_MARGIN and margin >= DPO_T * se
    assert broken_accuracy < DPO_ACCURACY and broken_margin < DPO_MARGIN and broken_margin < DPO_T * broken_se


# ------------------------------------------------------------------------------------------------- GRPO
# The GRPO claims are measured as held-out policy improvement (tools/policy_gain.py): the start model samples 8
# rollouts of each of n held-out questions, and a trained model's change of each rollout's log-probability is
# weighted by its group advantage. The greedy answers' gain is not the measure: over 20 steps it moved from -0.034
# to +0.058 between machines and seeds (README "Learning tests"), while the update's direction on held-out
# questions did not.
GRPO_T = 3.0  # the gain must clear 0 by this many standard errors: measured 4.3 to 10.6, flipped -1.8 to +1.4


def held_out_probe(world, start, n, *flags):
    return policy_gain.probe(str(start), str(world / "data" / "test.jsonl"), str(world / "data"), n, 8, int(SEED),
                             ["--rule_metric", "exact", "--max_new_tokens", "32", *flags])


def gains_with_and_against_the_reward(run, probe, steps, flipped_steps, tmp_path, monkeypatch, name):
    """Held-out policy gains (gain, its standard error) of a GRPO run (run(out, steps) -> the trained model's
    directory) and of the same run broken: each advantage's sign flipped (lower reward, higher weight)."""
    gain, se, better, worse = policy_gain.policy_gain(probe, common.load_model(str(run(tmp_path / "grpo", steps))))
    print(f"GRPO ({name}): held-out policy gain {gain:+.3f} ± {se:.3f} (log-prob change: better rollouts "
          f"{better:+.2f}, worse {worse:+.2f})")
    original = grpo.group_advantages

    def flipped(*a, **kw):
        adv, flat = original(*a, **kw)
        return -adv, flat

    monkeypatch.setattr(grpo, "group_advantages", flipped)
    broken, broken_se, better, worse = policy_gain.policy_gain(
        probe, common.load_model(str(run(tmp_path / "flipped", flipped_steps))))
    print(f"flipped advantage: held-out policy gain {broken:+.3f} ± {broken_se:.3f} (better {better:+.2f}, "
          f"worse {worse:+.2f})")
    return (gain, se), (broken, broken_se)


def grpo_run(world, sft, out, steps):
    """GRPO on the focus chain as pipeline.sh (box-free questions, lr 5e-4, KL weight 0.2) but 16 prompts x 8
    rollouts a step where pipeline.sh takes 8 (the steadier run)."""
    grpo.main(["--task", "focus", "--model", str(sft[0] / "final"), "--data", str(world / "data" / "questions.jsonl"),
               "--image_root", str(world / "data"), "--output_dir", str(out), "--rule_metric", "exact",
               "--finetune", "full", "--lr", "5e-4", "--warmup_ratio", "0.15", "--beta", "0.2", "--max_steps",
               str(steps), "--batch_size", "16", "--num_generations", "8", "--max_new_tokens", "32", "--seed", SEED,
               "--sample_steps", "0"])
    return out / "final"


def test_grpo_improves_the_policy_on_held_out_questions_and_a_flipped_advantage_does_not(world, sft, tmp_path,
                                                                                          monkeypatch):
    """VisRL's chain rolled out whole (box -> crop -> answer), rewarded by the answer alone, 20 steps: on
    held-out questions the update raises the rollouts that answered better than their group against the worse
    ones, beyond noise (a no-op gives exactly 0 and fails); the same run with the advantage's sign flipped (lower
    reward, higher weight), 5 steps, does not."""
    probe = held_out_probe(world, sft[0] / "final", 512, "--task", "focus")
    (gain, se), (broken, broken_se) = gains_with_and_against_the_reward(
        lambda out, steps: grpo_run(world, sft, out, steps), probe, 20, 5, tmp_path, monkeypatch, "focus")
    assert gain >= GRPO_T * se and broken < GRPO_T * broken_se


# ------------------------------------------------------------------------------------ multi-turn zoom

ZOOM_FLAGS = ("--max_turns", "2", "--max_new_tokens", "48", "--rule_metric", "exact")  # one call, then answer


@pytest.fixture(scope="module")
def zoom_sft(world, sft, tmp_path_factory):
    """The zoom policy's cold start: the pipeline's SFT model fine-tuned (150 steps) on zoom traces of its own
    annotated records, half with one call on the record's box (any object's, as in the regime), half
    answering at once."""
    out = tmp_path_factory.mktemp("zoom_sft")
    traces = []
    for i, rec in enumerate(common.read_records(str(world / "data" / "train.jsonl"))):
        box = rec.pop("bbox")
        traces.append(dict(rec, zooms=[box] if i % 2 else []))
    common.write_jsonl(str(out / "traces.jsonl"), traces)
    run_script(sys.executable, os.path.join(ROOT, "sft.py"), "--model", str(sft[0] / "final"), "--data",
               str(out / "traces.jsonl"), "--image_root", str(world / "data"), "--output_dir", str(out / "run"),
               "--finetune", "full", "--lr", "5e-4", "--warmup_ratio", "0.1", "--max_steps", "150", "--batch_size",
               "8", "--box_decimals", "2", "--seed", SEED)
    return out / "run" / "final"


def zoom_grpo_run(world, zoom_sft, out, steps):
    """GRPO --task zoom on the box-free questions: answer reward plus DeepEyes' tool bonus (a call that led
    to a right answer), with the task's default aggregation, dr-grpo (README "Zoom": with seq-mean-token-mean a
    two-token direct answer weighs twenty times a forty-token zoom turn per token), 16 prompts x 8 rollouts a
    step."""
    grpo.main(["--task", "zoom", "--model", str(zoom_sft), "--data", str(world / "data" / "questions.jsonl"),
               "--image_root", str(world / "data"), "--output_dir", str(out), "--rewards", "answer,zoom_tool",
               "--finetune", "full", "--lr", "5e-4", "--warmup_ratio", "0.15", "--beta", "0.2", "--max_steps",
               str(steps), "--batch_size", "16", "--num_generations", "8", "--seed", SEED, "--sample_steps", "0",
               *ZOOM_FLAGS])
    return out / "final"


def test_grpo_zoom_improves_the_policy_on_held_out_questions_and_a_flipped_advantage_does_not(world, zoom_sft, tmp_path,
                                                                                               monkeypatch):
    """Multi-turn zoom, 20 steps, the same claim on the zoom loop's rollouts (with their rewards: answer and
    tool bonus); flipped, 3 steps."""
    probe = held_out_probe(world, zoom_sft, 128, "--task", "zoom", "--rewards", "answer,zoom_tool", *ZOOM_FLAGS)
    (gain, se), (broken, broken_se) = gains_with_and_against_the_reward(
        lambda out, steps: zoom_grpo_run(world, zoom_sft, out, steps), probe, 20, 3, tmp_path, monkeypatch, "zoom")
    assert gain >= GRPO_T * se and broken < GRPO_T * broken_se
