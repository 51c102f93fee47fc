"""Held-out policy improvement of a GRPO run (focus or zoom), or of any model trained from the same start (a DPO
stage, a control), a measure that does not need the greedy answers to move: the start model samples G rollouts
per held-out question (VisRL's chain box -> crop -> answer, or the zoom loop), each gets its group advantage
from the run's rewards, and for each trained model the change of each rollout's log-probability (start ->
trained) is weighted by its advantage. The gain is the mean of that product
over the questions whose group has a reward spread (each question: the mean over its rollouts whose advantage is
not 0, all G of them where the reward is 0 or 1), with its standard error over those questions. It is the
policy-gradient surrogate with the run's own advantages (each group's rewards centred and, under the default
--scale_rewards group, divided by their standard deviation), so to first order it follows the change in the
expected reward on those questions in units of each group's spread, not the change itself: positive when, on
questions it never saw, the update raised the better rollouts against the worse ones; a no-op gives 0, a small
update against the reward a negative number.

First order only: it sees how the start's rollouts moved, not where the probability they lost went. An update that
lowers the worse rollouts more than the better ones scores positive even when the mass goes to text the start
never samples: on pipeline.sh's models every trained model scored positive, the control (SFT continued) included,
and DPO stage 2 highest while its sampled reward fell 6.8 points (docs/toy_experiments.md, "The sampled policy").
It is not even a sure detector of a run against the reward: a zoom GRPO run with the advantage flipped put the
mass on one bad mode, the start's scattered bad replies lost more than its good ones, and it scored +5.7 SE while
its own samples' reward fell 4.7 SE (README "Learning tests"). So a gain says that the update moved the policy on
held-out questions (a no-op cannot score), not that it helped, and --reward_n adds the direct measure: each model
samples G rollouts of the first N questions itself and its mean reward is compared with the start's, per question
(paired; the probe's seed, so an unchanged model draws the start's very rollouts and scores exactly 0).

    python tools/policy_gain.py --start runs/toy/sft/final --trained runs/toy/grpo/final \\
        --questions runs/toy/world/data/test.jsonl --n 96
    # pipeline.sh's models, each against the control (SFT continued for as many steps), paired per question
    python tools/policy_gain.py --start runs/toy/sft/final --questions runs/toy/world/data/test.jsonl --n 512 \\
        --reward_n 512 --trained runs/toy/{control,rl1,rl2,grpo}/final --against runs/toy/control/final
    # the zoom loop: any other grpo.py flag is passed on (rewards, turns, tokens)
    python tools/policy_gain.py --task zoom --start A --trained B --questions Q --rewards answer,zoom_tool \\
        --max_turns 2 --max_new_tokens 48
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import grpo  # noqa: E402


ROLLOUT_CHUNK = 16  # questions per sampling batch: the random draws depend on it


def sample_rollouts(module, processor, prompts, images, args, chunk=ROLLOUT_CHUNK):
    """G sampled rollouts per prompt from `module`, in prompt order, and their rewards (prompts, G)."""
    rollouts = []
    for s in common.progress(range(0, len(prompts), chunk), True, desc="rollouts", unit="chunk"):
        part = grpo.rollout(module, processor, prompts[s:s + chunk], images[s:s + chunk], args,
                            args.num_generations, do_sample=True)
        for r in part:
            r["prompt"] += s
        rollouts += part
    return rollouts, rollout_rewards(rollouts, prompts, args)


def rollout_rewards(rollouts, prompts, args, only=None):
    """(prompts, G) rewards: the run's weighted total, or the reward `only` alone (scored as the total is: 0 for
    a rollout grpo.score finds unusable)."""
    if only is not None:
        args = argparse.Namespace(**{**vars(args), "rewards": [only], "reward_weights": [1.0]})
    _, total = grpo.score(rollouts, prompts, args)
    return torch.tensor(total, dtype=torch.float64).view(-1, args.num_generations)


def question_rewards(rollouts, prompts, args, rewards):
    """Each question's mean reward over its rollouts: "total" (the run's weighted sum) and, with more than one
    reward, each reward alone (so a zoom run's answers can be told from its tool bonus)."""
    out = {"total": rewards.mean(1)}
    for name in args.rewards if len(args.rewards) > 1 else ():
        out[name] = rollout_rewards(rollouts, prompts, args, only=name).mean(1)
    return out


@torch.no_grad()
def rollout_logps(model, processor, rollouts, temperature, reuse_features=False, chunk=16):
    """Each rollout's summed log-probability (all its sequences) under `model`, at the sampling temperature.
    reuse_features: take each image's vision features from the rollout (the start model's) instead of running
    `model`'s vision tower again, for a model whose vision tower is the start's."""
    model.eval()
    out = []
    for s in range(0, len(rollouts), chunk):
        part = rollouts[s:s + chunk]
        seqs = [q for r in part for q in r["seqs"]]
        owner = torch.tensor([k for k, r in enumerate(part) for _ in r["seqs"]])
        logp, _ = grpo.sequence_logps(model, model, processor, seqs, temperature, torch.device("cpu"),
                                      reuse_features)
        out.append(torch.zeros(len(part), dtype=torch.float64).index_add_(0, owner, logp.double().sum(-1)))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def vision_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if common.is_vision_param(n)}


def probe(start, questions, image_root, n, num_generations, seed, grpo_flags=()):
    """The start model's sampled rollouts on the first n held-out questions, kept where their group has a
    reward spread, with their advantages, question indices and start log-probs (what policy_gain compares), the
    start's vision weights (a trained model that kept them reuses the rollouts' vision features), and what
    sampled_rewards needs: the questions, the seed and the start's mean rewards per question."""
    args = grpo.parse_args(["--model", start, "--data", questions, "--output_dir", os.devnull,
                            "--num_generations", str(num_generations), *grpo_flags])
    prompts = grpo.read_prompts(questions, image_root, args.task)[:n]
    images = grpo.load_images(prompts, image_root)
    processor = common.load_processor(start)
    model = common.load_model(start).eval()
    torch.manual_seed(seed)
    rollouts, rewards = sample_rollouts(model, processor, prompts, images, args)
    advantages = grpo.group_advantages(rewards, args.scale_rewards)[0].flatten()
    keep = advantages != 0
    kept = [r for r, k in zip(rollouts, keep.tolist()) if k]
    return {"processor": processor, "temperature": args.temperature, "rollouts": kept, "n_rollouts": len(rollouts),
            "n_questions": len(prompts), "advantages": advantages[keep].double(),
            "question": torch.tensor([r["prompt"] for r in kept]),
            "vision": vision_weights(model),
            "start_logps": rollout_logps(model, processor, kept, args.temperature, reuse_features=True),
            "prompts": prompts, "images": images, "args": args, "seed": seed,
            "start_rewards": question_rewards(rollouts, prompts, args, rewards)}


def sampled_rewards(held_out, model, n):
    """`model`'s question_rewards over G sampled rollouts of each of the probe's first n questions, drawn with
    the probe's seed and batching (so an unchanged model draws the start's very rollouts)."""
    torch.manual_seed(held_out["seed"])
    prompts, args = held_out["prompts"][:n], held_out["args"]
    rollouts, rewards = sample_rollouts(model.eval(), held_out["processor"], prompts, held_out["images"][:n], args)
    return question_rewards(rollouts, prompts, args, rewards)


def reward_change(held_out, after, key="total"):
    """(mean change, its standard error over the questions, the start's mean reward, the model's) of one of a
    model's sampled_rewards ("total", or one reward's name) against the start's on the same questions."""
    before = held_out["start_rewards"][key][:len(after[key])]
    return (*mean_and_se(after[key] - before), float(before.mean()), float(after[key].mean()))


def sampled_reward_change(held_out, model, n):
    """The direct measure, for any size of update: reward_change of `model`'s sampled_rewards (their total)."""
    return reward_change(held_out, sampled_rewards(held_out, model, n))


def question_gains(advantages, question, change):
    """Each question's mean of advantage * change over its rollouts (questions in the order of their index)."""
    if advantages.numel() == 0:
        raise ValueError("no rollout has a non-zero advantage (no group with a reward spread): nothing to measure")
    _, group = torch.unique(question, return_inverse=True)
    n = int(group.max()) + 1
    count = torch.zeros(n, dtype=torch.float64).index_add_(0, group, torch.ones_like(advantages, dtype=torch.float64))
    return torch.zeros(n, dtype=torch.float64).index_add_(0, group, (advantages * change).double()) / count


def mean_and_se(values):
    return float(values.mean()), float(values.std() / len(values) ** 0.5) if len(values) > 1 else float("nan")


def in_se(value, se):
    return f" ({value / se:+.1f} SE)" if se > 0 else ""


def weighted_change(advantages, question, change):
    """(gain, its standard error over questions, mean log-prob change of the better rollouts, of the worse):
    each question's mean of advantage * change over its rollouts, averaged over questions."""
    gain, se = mean_and_se(question_gains(advantages, question, change))
    return gain, se, float(change[advantages > 0].mean()), float(change[advantages < 0].mean())


def log_prob_change(held_out, model):
    """Each probe rollout's log-probability under `model` minus under the start."""
    vision = vision_weights(model)
    same_vision = vision.keys() == held_out["vision"].keys() and all(torch.equal(v, held_out["vision"][n])
                                                                      for n, v in vision.items())
    return rollout_logps(model, held_out["processor"], held_out["rollouts"], held_out["temperature"],
                         same_vision) - held_out["start_logps"]


def policy_gain(held_out, model):
    """weighted_change of `model` against the start, on a probe's rollouts."""
    return weighted_change(held_out["advantages"], held_out["question"], log_prob_change(held_out, model))


def main(argv=None):
    parser = common.ArgumentParser(__doc__)
    parser.add_argument("--start", required=True, help="the model GRPO started from (it samples the rollouts)")
    parser.add_argument("--trained", required=True, nargs="+", help="trained models to measure")
    parser.add_argument("--questions", required=True, help="held-out records (JSONL with question and answer)")
    parser.add_argument("--image_root", default=None, help="image root (default: the questions file's directory)")
    parser.add_argument("--task", choices=("focus", "zoom"), default="focus")
    parser.add_argument("--n", type=common.POSITIVE_INT, default=96, help="held-out questions (the first n)")
    parser.add_argument("--num_generations", type=common.POSITIVE_INT, default=8, help="rollouts per question")
    parser.add_argument("--seed", type=common.SEED, default=0)
    parser.add_argument("--reward_n", type=common.POSITIVE_INT, default=None,
                        help="also the direct measure: each model's sampled reward on the first N questions against "
                        "the start's (sampled_reward_change; the total, and each reward alone where there are "
                        "several)")
    parser.add_argument("--against", default=None, help="one of --trained (a control): every other one's gain "
                        "minus its gain, per question, with the standard error of that paired difference")
    a, grpo_flags = parser.parse_known_args(argv)
    if a.reward_n and a.reward_n != a.n and (a.reward_n > a.n or a.reward_n % ROLLOUT_CHUNK):
        parser.error(f"--reward_n {a.reward_n}: must be --n ({a.n}) or a multiple of {ROLLOUT_CHUNK} below it, so that "
                     "its questions are sampled in the probe's batches (an unchanged model then draws the start's "
                     "very rollouts)")
    if a.against and a.against not in a.trained:
        parser.error(f"--against {a.against}: not one of --trained")
    for flag, path in [("--start", a.start)] + [("--trained", t) for t in a.trained]:
        common.check_model_path(path, flag)
    image_root = a.image_root or os.path.dirname(os.path.abspath(a.questions))
    defaults = ["--rule_metric", "exact", "--max_new_tokens", "32"]  # the toy's: later flags override them
    held_out = probe(a.start, a.questions, image_root, a.n, a.num_generations, a.seed,
                     ["--task", a.task, *defaults, *grpo_flags])
    kept = len(held_out["rollouts"])
    print(f"{kept} of {held_out['n_rollouts']} rollouts have a non-zero advantage "
          f"({held_out['n_questions']} questions)")
    if not kept:
        print("no group has a reward spread: no policy gain to measure (more questions, or a start model that "
              "answers some right)")
    per_question, rewards = {}, {}
    for path in a.trained:
        model = common.load_model(path)
        if kept:
            change = log_prob_change(held_out, model)
            gain, se, better, worse = weighted_change(held_out["advantages"], held_out["question"], change)
            per_question[path] = question_gains(held_out["advantages"], held_out["question"], change)
            print(f"{path}: policy gain {gain:+.4f} ± {se:.4f}{in_se(gain, se)}; mean log-prob change "
                  f"{better:+.3f} (rollouts better than their group), {worse:+.3f} (worse)")
        if a.reward_n:
            sampled = sampled_rewards(held_out, model, a.reward_n)
            rewards[path] = sampled["total"]
            for key in sampled:  # the total, then each reward alone where there are several
                change, change_se, before, after = reward_change(held_out, sampled, key)
                print(f"{path}: sampled reward{'' if key == 'total' else ' ' + key} on {len(sampled[key])} questions "
                      f"{before:.4f} -> {after:.4f}, {change:+.4f} ± {change_se:.4f}{in_se(change, change_se)}")
    for path in a.trained if a.against else []:
        if path != a.against:
            for measure, values in (("policy gain", per_question), ("sampled reward", rewards)):
                if values:
                    diff, se = mean_and_se(values[path] - values[a.against])
                    print(f"{path} - {a.against}: {measure} {diff:+.4f} ± {se:.4f}{in_se(diff, se)} (paired over "
                          f"questions)")


if __name__ == "__main__":
    try:
        main()
    except common.DataError as e:  # bad input: the message names the file and line, or the record
        raise SystemExit(f"policy_gain.py: error: {e}")
