"""The learning tests' GRPO measures, shared by the focus claim (test_learning_focus.py) and the zoom claim
(test_learning_zoom.py)."""
from conftest import LEARNING_SEED

import common
import grpo
from tools import policy_gain

# The GRPO claims are measured on held-out questions in two ways (tools/policy_gain.py). The policy gain: the
# start model samples 8 rollouts of each of n held-out questions, and a trained model's change of each rollout's
# log-probability is weighted by its group advantage; it shows that the update moved the policy on questions it
# never saw, in the reward's direction to first order (a no-op scores exactly 0). The sampled reward: the trained
# model samples 8 rollouts of each of the first questions itself, paired per question with the start's; it sees
# where the probability went. A claim asks both: the policy gain clears GRPO_T standard errors, and the sampled
# reward does not fall by more than NO_LOSS_T (focus: in 20 steps the run does not clearly raise it) or rises
# (zoom: the answer reward alone, without the tool bonus, by test_learning_zoom.ZOOM_REWARD_T). The broken run
# (advantage flipped) misses the claim by its sampled reward (the total), which must fall by more than LOSS_T. Its
# policy gain is printed, not asserted: it is no detector of a run against the reward. A flipped run collapses
# onto one bad reply, which lowers the start's other bad replies more than its good ones, read as a preference for
# the good ones: on the AMD EPYC flipped runs scored up to +9.9 SE (focus) and +11.6 SE (zoom) while their sampled
# reward fell (README "Learning tests"). The greedy answers' gain is not a measure: over 20 steps it moved from
# -0.034 to +0.058 between machines and seeds (README "Learning tests").
GRPO_T = 3.0  # measured: policy gain focus 4.0 to 10.6, zoom 5.7 to 14.6
NO_LOSS_T = 2.0  # the focus run's sampled reward, two worlds, two machines: -0.3 to +3.2 SE
LOSS_T = 3.0  # the flipped runs' sampled reward: focus -4.3 to -23.6 SE, zoom -3.5 to -7.6


def held_out_probe(world, start, n, *flags):
    return policy_gain.probe(str(start), str(world / "data" / "test.jsonl"), str(world / "data"), n, 8,
                             int(LEARNING_SEED), ["--rule_metric", "exact", "--max_new_tokens", "32", *flags])


def measure(probe, model_dir, reward_n, name):
    """(policy gain, its standard error), {reward: (sampled reward change on the first reward_n questions, its
    SE)} for "total" and, where the run has several rewards, each alone."""
    model = common.load_model(str(model_dir))
    gain, se, better, worse = policy_gain.policy_gain(probe, model)
    sampled = policy_gain.sampled_rewards(probe, model, reward_n)
    changes, report = {}, []
    for key in sampled:
        change, change_se, before, after = policy_gain.reward_change(probe, sampled, key)
        changes[key] = change, change_se
        report.append(f"sampled reward{'' if key == 'total' else ' ' + key} on {reward_n} questions {before:.3f} "
                      f"-> {after:.3f}, {change:+.3f} ± {change_se:.3f}{policy_gain.in_se(change, change_se)}")
    print(f"{name}: held-out policy gain {gain:+.3f} ± {se:.3f}{policy_gain.in_se(gain, se)}, log-prob change: "
          f"better rollouts {better:+.2f}, worse {worse:+.2f}; " + "; ".join(report))
    return (gain, se), changes


def check_with_and_against_the_reward(run, probe, steps, flipped_steps, reward_n, tmp_path, monkeypatch, name,
                                      reward_bar, bar_on="total"):
    """A GRPO run (run(out, steps) -> the trained model's directory) and the same run broken, each advantage's
    sign flipped (lower reward, higher weight), measured on the probe's held-out questions: the run's policy gain
    clears GRPO_T standard errors and the change of its sampled reward bar_on (the total, or one reward alone)
    reward_bar standard errors (-NO_LOSS_T: no worse by more than noise; ZOOM_REWARD_T: higher); the broken run's
    sampled total reward falls by more than LOSS_T."""
    (gain, se), changes = measure(probe, run(tmp_path / "grpo", steps), reward_n, f"GRPO ({name})")
    reward, reward_se = changes[bar_on]
    original = grpo.group_advantages

    def flipped(*a, **kw):
        adv, flat = original(*a, **kw)
        return -adv, flat

    monkeypatch.setattr(grpo, "group_advantages", flipped)
    _, broken = measure(probe, run(tmp_path / "flipped", flipped_steps), reward_n, "flipped advantage")
    broken_reward, broken_reward_se = broken["total"]
    assert gain >= GRPO_T * se and reward >= reward_bar * reward_se
    assert broken_reward <= -LOSS_T * broken_reward_se
