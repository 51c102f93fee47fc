"""Learning, in pipeline.sh's regime: SFT on annotated records whose boxes do not say where the answer is (in
a scene with distractors the box is any of its objects), then RL on questions without boxes. One shared SFT
fixture, an SFT run as the pipeline's (conftest's learning_sft; the GRPO claims, test_learning_focus.py and
test_learning_zoom.py, start from it too). Every RL claim is a held-out measure that must clear 0 by a number of
its own standard errors (DPO: the preference margin on held-out pairs; GRPO: the policy gain of tools/policy_gain.py on
held-out questions), and is checked against a broken counterpart (the preference or the advantage with its
sign flipped) that must miss the same bar. The bars are sized by the values measured across perturbed runs
(LEARNING_SEED=1: another world and training seed; other RL seeds) and machines: README, "Learning tests"."""
import json
import os
import sys

import pytest
from conftest import LEARNING_SEED as SEED, ROOT, run_script

import common
import eval as evaluate
import gen_pairs
import rl_stage1
from tools import compare

HELD_OUT = 300  # test questions the SFT chain is scored on


def chain_eval(model, world, out, n):
    """What pipeline.sh runs after each stage: eval.py's chain protocol (infer, then score), on the first n
    test questions. Returns (report, per-question items)."""
    questions = str(out) + ".questions.jsonl"
    common.write_jsonl(questions, common.read_jsonl(str(world / "data" / "test.jsonl"))[:n])
    evaluate.main(["--protocol", "chain", "--questions", questions, "--image_root", str(world / "data"),
                   "--model", str(model), "--out", str(out), "--batch_size", "64", "--max_new_tokens", "32"])
    return compare.read_report(str(out))


@pytest.fixture(scope="module")
def world(learning_sft):
    return learning_sft[0]


@pytest.fixture(scope="module")
def sft(learning_sft, tmp_path_factory):
    """The shared SFT run (conftest's learning_sft), and its chain on the held-out questions (the RL tests'
    starting point)."""
    world, out = learning_sft
    return out, chain_eval(out / "final", world, tmp_path_factory.mktemp("sft_eval") / "eval.json", HELD_OUT)


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
