"""Held-out policy improvement of a GRPO (focus) run, a measure that does not need the greedy answers to move:
the start model samples G rollouts of VisRL's chain (box -> crop -> answer) per held-out question, each gets
its group advantage from the answer reward, and for each trained model the change of each rollout's
log-probability (start -> trained) is weighted by its advantage and averaged over the rollouts whose group
has a reward spread. Positive: on questions it never saw, the update raised the better rollouts against the
worse ones; a no-op gives 0, an update against the reward a negative number.

    python tools/policy_gain.py --start runs/toy/sft/final --trained runs/toy/grpo/final \\
        --questions runs/toy/world/data/test.jsonl --n 96
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import grpo  # noqa: E402


def sample_rollouts(module, processor, prompts, images, args, chunk=16):
    """G sampled focus rollouts per prompt from `module`, in prompt order, with their group advantages."""
    rollouts = []
    for s in common.progress(range(0, len(prompts), chunk), True, desc="rollouts", unit="chunk"):
        part = grpo.rollout(module, processor, prompts[s:s + chunk], images[s:s + chunk], args,
                            args.num_generations, do_sample=True)
        for r in part:
            r["prompt"] += s
        rollouts += part
    _, total = grpo.score(rollouts, prompts, args)
    advantages, _ = grpo.group_advantages(torch.tensor(total).view(-1, args.num_generations), args.scale_rewards)
    return rollouts, advantages.flatten()


@torch.no_grad()
def rollout_logps(model, processor, rollouts):
    """Each rollout's summed log-probability (all its steps) under `model`, at temperature 1."""
    return torch.tensor([float(grpo.sequence_logps(model, model, processor, r["seqs"], 1.0, torch.device("cpu"),
                                                   reuse_features=False)[0].sum()) for r in rollouts])


def policy_gain(advantages, start_logps, trained_logps):
    """Mean advantage-weighted log-prob change over the rollouts with a non-zero advantage."""
    keep = advantages != 0
    return float((advantages[keep] * (trained_logps[keep] - start_logps[keep])).mean())


def main(argv=None):
    parser = common.ArgumentParser(__doc__)
    parser.add_argument("--start", required=True, help="the model GRPO started from (it samples the rollouts)")
    parser.add_argument("--trained", required=True, nargs="+", help="trained models to measure")
    parser.add_argument("--questions", required=True, help="held-out records (JSONL with question and answer)")
    parser.add_argument("--image_root", default=None, help="image root (default: the questions file's directory)")
    parser.add_argument("--n", type=common.POSITIVE_INT, default=96, help="held-out questions (the first n)")
    parser.add_argument("--num_generations", type=common.POSITIVE_INT, default=8, help="rollouts per question")
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    for flag, path in [("--start", a.start)] + [("--trained", t) for t in a.trained]:
        if not os.path.isdir(path):
            parser.error(f"{flag} {path}: no such directory")
    image_root = a.image_root or os.path.dirname(os.path.abspath(a.questions))
    args = grpo.parse_args(["--task", "focus", "--model", a.start, "--data", a.questions, "--output_dir", os.devnull,
                            "--rule_metric", "exact", "--max_new_tokens", "32",
                            "--num_generations", str(a.num_generations)])
    prompts = grpo.read_prompts(a.questions, image_root, "focus")[:a.n]
    images = grpo.load_images(prompts, image_root)
    processor = common.load_processor(a.start)
    start = common.load_model(a.start).eval()
    torch.manual_seed(a.seed)
    with torch.no_grad():
        rollouts, advantages = sample_rollouts(start, processor, prompts, images, args)
    keep = advantages != 0
    kept, adv = [r for r, k in zip(rollouts, keep.tolist()) if k], advantages[keep]
    print(f"{len(kept)} of {len(rollouts)} rollouts have a non-zero advantage ({len(prompts)} questions)")
    if not kept:
        print("no group has a reward spread: nothing to measure (more questions, or a start model that answers "
              "some right)")
        return
    start_logps = rollout_logps(start, processor, kept)
    for path in a.trained:
        trained_logps = rollout_logps(common.load_model(path).eval(), processor, kept)
        change = trained_logps - start_logps
        print(f"{path}: policy gain {policy_gain(adv, start_logps, trained_logps):+.4f}; mean log-prob change "
              f"{float(change[adv > 0].mean()):+.3f} (better than their group), "
              f"{float(change[adv < 0].mean()):+.3f} (worse)")


if __name__ == "__main__":
    try:
        main()
    except common.DataError as e:  # bad input: the message names the file and line, or the record
        raise SystemExit(f"policy_gain.py: error: {e}")
