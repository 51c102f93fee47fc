"""Learning, multi-turn zoom: a zoom cold start from the learning tests' SFT run (conftest's learning_sft), then
GRPO --task zoom on box-free questions; its held-out policy gain and sampled reward (tests/learning.py) must clear
their bar, and the same run with the advantage flipped must lower the sampled reward (README "Multi-turn zoom",
"Learning tests")."""
import os
import sys

import pytest
from conftest import LEARNING_SEED as SEED, ROOT, run_script
from learning import GRPO_T, check_with_and_against_the_reward, held_out_probe

import common
import grpo


@pytest.fixture(scope="module")
def world(learning_sft):
    return learning_sft[0]


ZOOM_FLAGS = ("--max_turns", "2", "--max_new_tokens", "48", "--rule_metric", "exact")  # one call, then answer


@pytest.fixture(scope="module")
def zoom_sft(world, learning_sft, tmp_path_factory):
    """The zoom policy's cold start: the shared SFT model fine-tuned (150 steps) on zoom traces of its own
    annotated records, half with one call on the record's box (any object's, as in the regime), half
    answering at once."""
    out = tmp_path_factory.mktemp("zoom_sft")
    traces = []
    for i, rec in enumerate(common.read_records(str(world / "data" / "train.jsonl"))):
        box = rec.pop("bbox")
        traces.append(dict(rec, zooms=[box] if i % 2 else []))
    common.write_jsonl(str(out / "traces.jsonl"), traces)
    run_script(sys.executable, os.path.join(ROOT, "sft.py"), "--model", str(learning_sft[1] / "final"), "--data",
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
    """Multi-turn zoom, 20 steps, on the zoom loop's rollouts (with their rewards: answer and tool bonus), 128
    held-out questions for both measures: the policy gain clears its bar and the sampled reward rises by as many
    standard errors; flipped, 3 steps, the sampled reward falls."""
    probe = held_out_probe(world, zoom_sft, 128, "--task", "zoom", "--rewards", "answer,zoom_tool", *ZOOM_FLAGS)
    check_with_and_against_the_reward(lambda out, steps: zoom_grpo_run(world, zoom_sft, out, steps), probe, 20, 3, 128,
                                      tmp_path, monkeypatch, "zoom", reward_bar=GRPO_T)
