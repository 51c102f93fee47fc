"""GRPO throughput: grpo.py against TRL's GRPOTrainer on the same random-weight Qwen2-VL, the same prompts,
G, completion length, batch and steps, in one run (each trainer in its own process, so peak memory is its own;
HF generate on both sides).

    python bench/grpo_vs_trl.py --toy runs/toy/world                               # CPU: toy config scaled up
    python bench/grpo_vs_trl.py --toy runs/toy/world --arch qwen2-vl-2b --dtype bf16   # GPU: 2B shapes

Task: grounding on the toy's questions (focus prompt, grounding_giou reward), images resized to
--image_size; LoRA (rank 8, language model only) on both sides, beta 0.04 (reference = the adapter switched
off, on both sides), one update per generation. Reported per side: steady-state steps/s (steps after the
first two), the share of step time spent generating (rollouts, rewards, reference), peak memory (GPU:
max allocated; CPU: RSS), wall time.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dpo_vs_trl  # noqa: E402  (the model builder; torch-free at import)


def build(args):
    """The model (dpo_vs_trl.py's builder) and grounding prompts: each pair's chosen box is its record's box."""
    import common
    dpo_vs_trl.build(args, args.work)
    prompts = []
    for p in common.read_jsonl(os.path.join(args.work, "pairs.jsonl")):
        box = common.parse_box(p["chosen_box_text"], "viscot", p["width"], p["height"])
        prompts.append({"id": p["id"], "image": p["image"], "question": p["question"], "answer": p["answer"],
                        "bbox": box, "width": p["width"], "height": p["height"]})
    common.write_jsonl(os.path.join(args.work, "prompts.jsonl"), prompts)


PEAK = ("import resource, torch\n"
        "peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else "
        "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20\n")


def run_ours(args, model_dir):
    out = os.path.join(args.work, "ours")
    argv = [os.path.join(ROOT, "grpo.py"), "--task", "grounding", "--model", model_dir, "--data",
            os.path.join(args.work, "prompts.jsonl"), "--output_dir", out, "--finetune", "lora", "--dtype", args.dtype,
            "--batch_size", str(args.prompts), "--num_generations", str(args.G), "--max_new_tokens",
            str(args.max_new_tokens), "--max_steps", str(args.steps), "--lr", "1e-5", "--beta", "0.04",
            "--sample_steps", "0", "--attn", args.attn, *args.ours_extra.split()]
    code = ("import runpy, sys; sys.argv = " + repr(argv) + "; sys.path.insert(0, " + repr(ROOT) + ")\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n" + PEAK + "print('PEAK', peak)")
    t = time.time()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"grpo.py failed:\n{p.stderr[-4000:]}")
    wall = time.time() - t
    rows = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r][2:]
    step_s = [args.prompts * args.G / r["samples_per_s"] for r in rows]
    return {"steps_per_s": len(step_s) / sum(step_s), "generation_share": sum(r["generation_share"] * s for r, s in
                                                                              zip(rows, step_s)) / sum(step_s),
            "completion_length": sum(r["completion_length"] for r in rows) / len(rows),
            "peak_gb": float(p.stdout.strip().splitlines()[-1].split()[1]), "wall_s": wall}


TRL_SCRIPT = r'''
import json, sys, time
sys.path.insert(0, ROOT)
import torch
import common
import grpo
from datasets import Dataset
from PIL import Image
from peft import LoraConfig
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

model_dir, work, prompts_per_step, G, max_new, steps, dtype, attn = sys.argv[1:9]
prompts_per_step, G, max_new, steps = int(prompts_per_step), int(G), int(max_new), int(steps)
processor = common.load_processor(model_dir)
model = common.load_model(model_dir, common.resolve_dtype(dtype), attn)
recs = common.read_jsonl(work + "/prompts.jsonl")
data = Dataset.from_list([{"image": Image.open(work + "/" + r["image"]).convert("RGB"),
                           "prompt": common.focus_messages(r["question"]),  # the prompt grpo.py samples from
                           "bbox": r["bbox"], "width": r["width"], "height": r["height"]} for r in recs])

def grounding_giou(prompts, completions, bbox, width, height, **kw):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return grpo.REWARDS["grounding_giou"](texts, bbox=bbox, width=width, height=height)

times, gen = [], []
class Clock(TrainerCallback):
    def on_step_begin(self, a, s, c, **kw): self.t = time.time()
    def on_step_end(self, a, s, c, **kw): times.append(time.time() - self.t)
cuda = torch.cuda.is_available()
config = GRPOConfig(output_dir=work + "/trl", per_device_train_batch_size=prompts_per_step * G, num_generations=G,
                    max_completion_length=max_new, max_steps=steps, learning_rate=1e-5, beta=0.04, temperature=1.0,
                    logging_steps=1, report_to=[], save_strategy="no", use_cpu=not cuda, bf16=dtype == "bf16" and cuda,
                    gradient_checkpointing=False, dataloader_num_workers=0, seed=42, num_iterations=1,
                    steps_per_generation=1, loss_type="grpo", scale_rewards="group")
trainer = GRPOTrainer(model=model, reward_funcs=[grounding_giou], args=config, train_dataset=data,
                      processing_class=processor, callbacks=[Clock()],
                      peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=common.LM_ONLY_TARGETS,
                                             task_type="CAUSAL_LM"))
inner = trainer._generate_and_score_completions
def timed(*a, **kw):
    t = time.time()
    out = inner(*a, **kw)
    if cuda: torch.cuda.synchronize()
    gen.append(time.time() - t)
    return out
trainer._generate_and_score_completions = timed
trainer.train()
steady, g = times[2:], gen[2:len(times)]
''' + PEAK + r'''
print(json.dumps({"steps_per_s": len(steady) / sum(steady), "generation_share": sum(g) / sum(steady),
                  "peak_gb": peak}))
'''


def run_trl(args, model_dir):
    return dpo_vs_trl.run_trl_script(TRL_SCRIPT, model_dir, args.work, args.prompts, args.G, args.max_new_tokens,
                                     args.steps, args.dtype, args.attn)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", default=os.path.join(ROOT, "runs", "toy", "world"), help="a make_toy.py world")
    parser.add_argument("--work", default=os.path.join(ROOT, "runs", "bench_grpo"), help="scratch directory")
    parser.add_argument("--arch", default="toy", choices=["toy", *dpo_vs_trl.ARCHS],
                        help="toy: the toy Qwen2-VL config scaled by the flags below; otherwise a released model's "
                             "shapes (dpo_vs_trl.ARCHS; --toy must hold that family's toy model)")
    parser.add_argument("--image_size", type=int, default=448)
    parser.add_argument("--pairs", type=int, default=64, help="prompts to build")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--G", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--vision_depth", type=int, default=8)
    parser.add_argument("--vision_width", type=int, default=256)
    parser.add_argument("--lm_width", type=int, default=256)
    parser.add_argument("--only", default=None, choices=["ours", "trl"], help="run one side")
    parser.add_argument("--ours_extra", default="", help="more grpo.py flags, e.g. --no-merge_for_generation")
    parser.add_argument("--build_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dpo_vs_trl.check_steps(parser, args.steps)
    if args.build_only:
        build(args)
        return
    dpo_vs_trl.fresh_work(parser, args.work)
    subprocess.run([sys.executable, *sys.argv, "--build_only"], check=True)  # torch-free parent (dpo_vs_trl.py)
    model_dir = os.path.join(args.work, "model")
    results = {}
    for name, fn in (("ours", run_ours), ("trl", run_trl)):
        if args.only in (None, name):
            results[name] = r = fn(args, model_dir)
            print(f"{'grpo.py' if name == 'ours' else 'TRL GRPOTrainer':16s} {r['steps_per_s']:.3f} steps/s  "
                  f"generation {100 * r['generation_share']:.0f}%  peak {r['peak_gb']:.2f} GB  wall {r['wall_s']:.0f}s",
                  flush=True)
    if len(results) == 2:
        print(f"ratio (steady-state steps/s): {results['ours']['steps_per_s'] / results['trl']['steps_per_s']:.2f}x; "
              f"peak memory {results['ours']['peak_gb'] / results['trl']['peak_gb']:.2f}x")
    with open(os.path.join(args.work, "results.json"), "w") as f:
        json.dump({"args": vars(args), **results}, f, indent=1)


if __name__ == "__main__":
    main()
