"""Shared prefixes (common.prefix_groups): the loss forward and backward of one GRPO step's focus rollouts with
each prompt run once through the language model, against each sequence run whole, on the same model and
sequences, in one run.

    python bench/shared_prefix.py --model runs/toy/sft/final --data runs/toy/world/data/questions.jsonl

The rollouts are grpo.py's own (its `rollout`, sampled at T = 1): per prompt G box completions of one encoded
prompt and G answers on their crops. Reported per side: the tokens the language model runs (prefixes once, or
every sequence whole) and the median seconds of log-probs + backward over --repeats, after one warm-up; and the
largest log-prob difference between the two sides.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import grpo  # noqa: E402


def sync(device):
    if device.type == "cuda":  # kernels run asynchronously: time them finished
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="box-free questions (grpo.py --task focus records)")
    p.add_argument("--image_root", default=None)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="the shared cache needs sdpa or eager")
    a = p.parse_args()
    root = a.image_root or os.path.dirname(os.path.abspath(a.data))
    args = grpo.parse_args(["--task", "focus", "--model", a.model, "--data", a.data, "--output_dir", "unused",
                            "--max_new_tokens", "32"])
    torch.manual_seed(a.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = common.load_model(a.model, common.resolve_dtype(a.dtype), a.attn).to(device)
    processor = common.load_processor(a.model)
    chunk = grpo.read_prompts(a.data, root, "focus")[:a.prompts]
    model.eval()
    rollouts = grpo.rollout(model, processor, chunk, grpo.load_images(chunk, root), args, a.num_generations, True)
    model.train()
    seqs = [s for r in rollouts for s in r["seqs"]]
    batch = common.collate(grpo.train_batch(seqs), processor.tokenizer.pad_token_id)
    features = [f for s in seqs for f in s["features"]]
    cuts, group_of, owners = common.prefix_groups(model, batch, features)
    lengths = batch["attention_mask"].sum(1).tolist()
    tokens = {"shared": sum(cuts[r] for r in owners) + sum(n - c for n, c in zip(lengths, cuts)),
              "whole": sum(lengths)}

    def run(shared):
        groups = common.prefix_groups
        if not shared:
            common.prefix_groups = lambda *x: None
        try:
            times = []
            for k in range(a.repeats + 1):
                model.zero_grad()
                sync(device)
                t = time.perf_counter()
                logp, mask = grpo.sequence_logps(model, model, processor, seqs, 1.0, model.device, True)
                (logp * mask).sum().backward()
                sync(device)
                times.append(time.perf_counter() - t)
            return logp.detach(), statistics.median(times[1:])
        finally:
            common.prefix_groups = groups

    (shared, t_shared), (whole, t_whole) = run(True), run(False)
    print(f"{a.prompts} prompts x {a.num_generations}: {len(seqs)} sequences in {len(owners)} prefix groups, "
          f"{a.dtype}, {a.attn}, " + (torch.cuda.get_device_name() if device.type == "cuda" else
                                      f"{torch.get_num_threads()} CPU threads"))
    print("| side | tokens run | log-probs + backward, s |\n|---|---|---|")
    print(f"| each sequence whole | {tokens['whole']} | {t_whole:.3f} |")
    print(f"| shared prefixes | {tokens['shared']} | {t_shared:.3f} |")
    print(f"speed-up {t_whole / t_shared:.2f}x; largest log-prob difference {float((shared - whole).abs().max()):.2e}")


if __name__ == "__main__":
    main()
