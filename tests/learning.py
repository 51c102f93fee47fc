"""The learning tests' GRPO measure, shared by the focus claim (test_learning.py) and the zoom claim
(test_learning_zoom.py)."""
from conftest import LEARNING_SEED

import common
import grpo
from tools import policy_gain

# The GRPO claims are measured as held-out policy improvement (tools/policy_gain.py): the start model samples 8
# rollouts of each of n held-out questions, and a trained model's change of each rollout's log-probability is
# weighted by its group advantage. The greedy answers' gain is not the measure: over 20 steps it moved from -0.034
# to +0.058 between machines and seeds (README "Learning tests"), while the update's direction on held-out
# questions did not.
GRPO_T = 3.0  # the gain must clear 0 by this many standard errors: measured 4.3 to 10.6, flipped -1.8 to +1.4


def held_out_probe(world, start, n, *flags):
    return policy_gain.probe(str(start), str(world / "data" / "test.jsonl"), str(world / "data"), n, 8,
                             int(LEARNING_SEED), ["--rule_metric", "exact", "--max_new_tokens", "32", *flags])


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
