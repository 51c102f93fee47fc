"""The learning tests' GRPO measures, shared by the focus claim (test_learning_focus.py) and the zoom claim
(test_learning_zoom.py)."""
from conftest import LEARNING_SEED

import common
import grpo
from tools import policy_gain

# The GRPO claims are measured on held-out questions in two ways (tools/policy_gain.py). The policy gain: the start
# model samples 8 rollouts of each of n held-out questions, and a trained model's change of each rollout's
# log-probability is weighted by its group advantage; it shows the update's direction (first order), and must
# clear its bar where the same run with the advantage flipped does not. The sampled reward: the trained model
# samples 8 rollouts of each of the first questions itself, against the start's on the same questions; the run
# must not lower it, and the flipped run must. The greedy answers' gain is not the measure: over 20 steps it moved
# from -0.034 to +0.058 between machines and seeds (README "Learning tests"), while the update's direction on
# held-out questions did not.
GRPO_T = 3.0  # the gain must clear 0 by this many standard errors: measured 4.0 to 10.6, flipped -1.8 to +1.4
# The sampled reward must not fall by more than NO_LOSS_T standard errors (measured over two worlds and two sampling
# seeds: focus +0.0 to +2.8, zoom +6.5 to +10.1), and the flipped run's must fall by more than LOSS_T (focus -4.3 to
# -15.4, zoom -3.9 to -6.7).
NO_LOSS_T, LOSS_T = 2.0, 3.0


def held_out_probe(world, start, n, *flags):
    return policy_gain.probe(str(start), str(world / "data" / "test.jsonl"), str(world / "data"), n, 8,
                             int(LEARNING_SEED), ["--rule_metric", "exact", "--max_new_tokens", "32", *flags])


def measure(probe, model_dir, reward_n, name):
    """(policy gain, its standard error), (sampled reward change on the first reward_n questions, its SE)."""
    model = common.load_model(str(model_dir))
    gain, se, better, worse = policy_gain.policy_gain(probe, model)
    change, change_se, before, after = policy_gain.sampled_reward_change(probe, model, reward_n)
    print(f"{name}: held-out policy gain {gain:+.3f} ± {se:.3f}{policy_gain.in_se(gain, se)}, log-prob change: "
          f"better rollouts {better:+.2f}, worse {worse:+.2f}; sampled reward on {reward_n} questions {before:.3f} "
          f"-> {after:.3f}, {change:+.3f} ± {change_se:.3f}{policy_gain.in_se(change, change_se)}")
    return (gain, se), (change, change_se)


def check_with_and_against_the_reward(run, probe, steps, flipped_steps, reward_n, tmp_path, monkeypatch, name):
    """A GRPO run (run(out, steps) -> the trained model's directory) and the same run broken, each advantage's
    sign flipped (lower reward, higher weight), measured on the probe's held-out questions: the run's policy gain
    clears GRPO_T standard errors and its sampled reward does not fall; the broken run's gain does not clear the
    bar and its sampled reward falls."""
    (gain, se), (reward, reward_se) = measure(probe, run(tmp_path / "grpo", steps), reward_n, f"GRPO ({name})")
    original = grpo.group_advantages

    def flipped(*a, **kw):
        adv, flat = original(*a, **kw)
        return -adv, flat

    monkeypatch.setattr(grpo, "group_advantages", flipped)
    (broken, broken_se), (broken_reward, broken_reward_se) = measure(
        probe, run(tmp_path / "flipped", flipped_steps), reward_n, "flipped advantage")
    assert gain >= GRPO_T * se and broken < GRPO_T * broken_se
    assert reward >= -NO_LOSS_T * reward_se and broken_reward <= -LOSS_T * broken_reward_se
