"""Learning, GRPO on VisRL's chain (--task focus) from the learning tests' SFT run (conftest's learning_sft), on
box-free questions: the held-out policy gain of tests/learning.py must clear its bar and the sampled answers must
not score lower, and the same run with the advantage flipped must score lower (README "Learning tests")."""
import pytest
from conftest import LEARNING_SEED as SEED
from learning import NO_LOSS_T, check_with_and_against_the_reward, held_out_probe

import grpo


@pytest.fixture(scope="module")
def world(learning_sft):
    return learning_sft[0]


@pytest.fixture(scope="module")
def sft(learning_sft):
    return learning_sft[1]


def grpo_run(world, sft, out, steps):
    """GRPO on the focus chain as pipeline.sh (box-free questions, lr 5e-4, KL weight 0.2) but with 16 prompts x 8
    rollouts a step for 20 steps, one update each, where pipeline.sh takes 150 steps of 8 x 8 with two updates
    each."""
    grpo.main(["--task", "focus", "--model", str(sft / "final"), "--data", str(world / "data" / "questions.jsonl"),
               "--image_root", str(world / "data"), "--output_dir", str(out), "--rule_metric", "exact",
               "--finetune", "full", "--lr", "5e-4", "--warmup_ratio", "0.15", "--beta", "0.2", "--max_steps",
               str(steps), "--batch_size", "16", "--num_generations", "8", "--max_new_tokens", "32", "--seed", SEED,
               "--sample_steps", "0"])
    return out / "final"


def test_grpo_improves_the_policy_on_held_out_questions_and_a_flipped_advantage_does_not(world, sft, tmp_path,
                                                                                          monkeypatch):
    """VisRL's chain rolled out whole (box -> crop -> answer), rewarded by the answer alone, 20 steps: on
    held-out questions (512) the update raises the rollouts that answered better than their group against the
    worse ones, beyond noise (a no-op gives exactly 0 and fails), and its own sampled answers (256 questions) do
    not score lower than the start's; the same run with the advantage's sign flipped (lower reward, higher
    weight), 5 steps, scores lower on its sampled answers."""
    probe = held_out_probe(world, sft / "final", 512, "--task", "focus")
    check_with_and_against_the_reward(lambda out, steps: grpo_run(world, sft, out, steps), probe, 20, 5, 256,
                                      tmp_path, monkeypatch, "focus", reward_bar=-NO_LOSS_T)
