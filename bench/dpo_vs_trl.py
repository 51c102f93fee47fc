"""Stage-1 DPO throughput: rl_stage1.py against TRL's DPOTrainer on the same random-weight Qwen2-VL, the same
pairs, batch size and steps, in one run (each trainer in its own process, so peak memory is its own).

    python bench/dpo_vs_trl.py --toy runs/toy/world [--image_size 448] [--pairs 64] [--batch_size 4] [--steps 12]

The model is the toy's config scaled up so the vision tower matters (448x448 images: 1024 patches, 256
image tokens each; vision depth/width and LM width as flags), full fine-tuning, fp32, sigmoid loss, beta
0.1. Pairs: the toy questions, chosen = the annotated box's text, rejected = another cell's. Reported: the
first step's loss on both sides (both start from policy = reference, so log 2), steady-state pairs/s
(steps after the first two), wall time including rl_stage1.py's one reference pass, and peak RSS.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FULL, LINEAR = "full_attention", "linear_attention"
# Released checkpoints' shapes with random weights (grpo_vs_trl.py --arch), each from the toy model of its family
# (tools/make_toy.py --families): its tokenizer's ids are a subset of the real vocabulary, so the embedding and LM
# head cost what the real ones do. qwen2-vl-2b and qwen3-vl-8b: their config.json; qwen3.5-9b: transformers'
# Qwen3_5Config defaults ("Qwen3.5-9B style"), with a full-attention layer every fourth.
ARCHS = {
    "qwen2-vl-2b": {"toy": "qwen2-vl", "tie": True,
                    "text": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                             "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                             "layer_types": [FULL] * 28, "max_window_layers": 28,
                             "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                 "mrope_section": [16, 24, 24]}},
                    "vision": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "hidden_size": 1536}},  # merger output
    "qwen3-vl-8b": {"toy": "qwen3-vl", "tie": False,
                    "text": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                             "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                             "vocab_size": 151936,
                             "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_interleaved": True,
                                                 "mrope_section": [24, 20, 20]}},
                    "vision": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                               "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24],
                               "out_hidden_size": 4096}},
    "qwen3.5-9b": {"toy": "qwen3.5", "tie": False,
                   "text": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 32,
                            "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 256,
                            "vocab_size": 248320, "layer_types": [LINEAR, LINEAR, LINEAR, FULL] * 8,
                            "linear_num_value_heads": 32, "linear_num_key_heads": 16, "linear_key_head_dim": 128,
                            "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
                            "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "mrope_interleaved": True,
                                                "mrope_section": [11, 11, 10], "partial_rotary_factor": 0.25}},
                   "vision": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                              "num_position_embeddings": 2304, "out_hidden_size": 4096}},
}


def fresh_work(parser, work):
    """Empty `work` for a run: replaced only when missing, empty or made by an earlier bench run (its marker),
    never a folder holding other files (--work runs, --work ~)."""
    marker = os.path.join(work, ".bench_work")
    if os.path.isfile(work) or (os.path.isdir(work) and os.listdir(work) and not os.path.exists(marker)):
        parser.error(f"--work {work}: holds files no bench run wrote (no {marker}); choose another --work, or "
                     "remove it yourself")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    open(marker, "w").close()


def check_steps(parser, steps):
    if steps < 3:
        parser.error(f"--steps {steps}: at least 3 (the first two steps are warm-up and not timed)")


def released_config(toy, arch):
    """A released model's config (ARCHS[arch]) built on its family's toy model in the world `toy`: the toy's
    token ids and processor, the real shapes."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(os.path.join(toy, ARCHS[arch]["toy"]))
    for k, v in ARCHS[arch]["text"].items():
        setattr(config.text_config, k, v)
    for k, v in ARCHS[arch]["vision"].items():
        setattr(config.vision_config, k, v)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = ARCHS[arch]["tie"]
    # a trained checkpoint's weight scale: the toy's std 0.08 at width 4096 overflows bf16 activations
    config.initializer_range = config.text_config.initializer_range = config.vision_config.initializer_range = 0.02
    return config


def build(args, work):
    """The scaled model (work/model) and the pairs (work/pairs.jsonl)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    import common
    arch = getattr(args, "arch", "toy")
    toy_model = os.path.join(args.toy, ARCHS[arch]["toy"] if arch != "toy" else "qwen2-vl")
    model_dir = os.path.join(work, "model")
    if arch != "toy":
        config = released_config(args.toy, arch)
    else:
        config = AutoConfig.from_pretrained(toy_model)
        config.vision_config.depth, config.vision_config.embed_dim = args.vision_depth, args.vision_width
        config.vision_config.num_heads = args.vision_width // 64
        config.vision_config.hidden_size = config.text_config.hidden_size = args.lm_width
        config.text_config.intermediate_size = 4 * args.lm_width
        config.text_config.num_attention_heads, config.text_config.num_key_value_heads = args.lm_width // 32, 2
    torch.manual_seed(0)
    if arch != "toy":  # bf16 as a real checkpoint holds it, initialised on the GPU where there is one (minutes on CPU)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    else:
        model = AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(model_dir)
    for name in os.listdir(toy_model):
        if not name.endswith((".safetensors", "config.json")) or name == "preprocessor_config.json":
            shutil.copy(os.path.join(toy_model, name), model_dir)
    with open(os.path.join(model_dir, "preprocessor_config.json")) as f:
        pre = json.load(f)
    pre["max_pixels"] = max(pre["max_pixels"], args.image_size ** 2)
    with open(os.path.join(model_dir, "preprocessor_config.json"), "w") as f:
        json.dump(pre, f)
    n = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for name, p in model.named_parameters() if common.is_vision_param(name))

    records = common.read_records(os.path.join(args.toy, "data", "train.jsonl"))[:args.pairs]
    os.makedirs(os.path.join(work, "images"), exist_ok=True)
    pairs = []
    for i, r in enumerate(records):
        im = common.load_image(r, os.path.join(args.toy, "data")).resize((args.image_size, args.image_size))
        name = f"images/{i}.png"
        im.save(os.path.join(work, name))
        sx, sy = args.image_size / r["width"], args.image_size / r["height"]
        box = [r["bbox"][0] * sx, r["bbox"][1] * sy, r["bbox"][2] * sx, r["bbox"][3] * sy]
        wrong = [(box[0] + args.image_size / 3) % (args.image_size * 2 / 3), box[1], 0, box[3]]
        wrong[2] = wrong[0] + box[2] - box[0]
        s = args.image_size
        pairs.append({"id": r["id"], "image": name, "question": r["question"], "answer": r["answer"], "width": s,
                      "height": s, "chosen_box_text": common.box_to_text(box, "viscot", s, s, 2),
                      "rejected_box_text": common.box_to_text(wrong, "viscot", s, s, 2)})
    common.write_jsonl(os.path.join(work, "pairs.jsonl"), pairs)
    print(f"model: {n / 1e6:.1f}M parameters ({vision / 1e6:.1f}M vision); {len(pairs)} pairs of "
          f"{args.image_size}x{args.image_size} images", flush=True)


def run_ours(args, work, model_dir):
    out = os.path.join(work, "ours")
    argv = [os.path.join(ROOT, "rl_stage1.py"), "--model", model_dir, "--data", os.path.join(work, "pairs.jsonl"),
            "--output_dir", out, "--finetune", "full", "--dtype", "fp32", "--batch_size", str(args.batch_size),
            "--max_steps", str(args.steps), "--eval_fraction", "0", "--lr", "1e-5", "--warmup_ratio", "0"]
    # Run as __main__ in a child that reports its own peak RSS when done.
    code = ("import resource, runpy, sys; sys.argv = " + repr(argv) + "; sys.path.insert(0, " + repr(ROOT) + ")\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    t = time.time()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"rl_stage1.py failed:\n{p.stderr[-4000:]}")
    wall = time.time() - t
    rows = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r]
    step_s = [args.batch_size / r["pairs_per_s"] for r in rows[2:]]  # as TRL's side: pairs over the steps' time
    steady = args.batch_size * len(step_s) / sum(step_s)
    peak = int(p.stdout.strip().splitlines()[-1].split()[1])
    return {"first_loss": rows[0]["loss"], "pairs_per_s": steady, "wall_s": wall, "peak_rss_gb": peak / 2 ** 20}


TRL_SCRIPT = r'''
import json, sys, time
sys.path.insert(0, ROOT)
import common
from datasets import Dataset
from PIL import Image
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

model_dir, work, batch_size, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
processor = common.load_processor(model_dir)
model = common.load_model(model_dir)
pairs = common.read_jsonl(work + "/pairs.jsonl")
def reply(text):
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]
data = Dataset.from_list([{"images": [Image.open(work + "/" + p["image"]).convert("RGB")],
                           "prompt": common.focus_messages(p["question"]),  # the same prompt rl_stage1.py trains on
                           "chosen": reply(p["chosen_box_text"]), "rejected": reply(p["rejected_box_text"])}
                          for p in pairs])
times, losses = [], []
class Clock(TrainerCallback):
    def on_step_begin(self, a, s, c, **kw): self.t = time.time()
    def on_step_end(self, a, s, c, **kw): times.append(time.time() - self.t)
    def on_log(self, a, s, c, logs=None, **kw):
        if logs and "loss" in logs: losses.append(logs["loss"])
config = DPOConfig(output_dir=work + "/trl", per_device_train_batch_size=batch_size, max_steps=steps,
                   learning_rate=1e-5, lr_scheduler_type="cosine", warmup_steps=0, logging_steps=1, beta=0.1,
                   loss_type=["sigmoid"], max_length=None, report_to=[], save_strategy="no", use_cpu=True,
                   gradient_checkpointing=False, bf16=False, dataloader_num_workers=0, seed=42)
trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=processor, callbacks=[Clock()])
trainer.train()
steady = times[2:]
import resource
print(json.dumps({"first_loss": losses[0], "pairs_per_s": batch_size / (sum(steady) / len(steady)),
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}))
'''


def run_trl_script(script, *argv):
    """A TRL trainer script in a child process (its peak memory its own); its last stdout line is JSON."""
    t = time.time()
    p = subprocess.run([sys.executable, "-c", f"ROOT = {ROOT!r}\n" + script, *map(str, argv)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise SystemExit(f"TRL run failed:\n{p.stderr[-4000:]}")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.time() - t
    return result


def run_trl(args, work, model_dir):
    return run_trl_script(TRL_SCRIPT, model_dir, work, args.batch_size, args.steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", default=os.path.join(ROOT, "runs", "toy", "world"), help="a make_toy.py world")
    parser.add_argument("--work", default=os.path.join(ROOT, "runs", "bench_dpo"), help="scratch directory")
    parser.add_argument("--image_size", type=int, default=448)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--vision_depth", type=int, default=8)
    parser.add_argument("--vision_width", type=int, default=256)
    parser.add_argument("--lm_width", type=int, default=256)
    parser.add_argument("--build_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    check_steps(parser, args.steps)
    if args.build_only:
        build(args, args.work)
        return
    fresh_work(parser, args.work)
    # Built in a child: this process stays free of torch, whose idle OpenMP threads would compete with the
    # measured runs.
    subprocess.run([sys.executable, *sys.argv, "--build_only"], check=True)
    model_dir = os.path.join(args.work, "model")
    results = {}
    for name, fn in (("rl_stage1.py", run_ours), ("TRL DPOTrainer", run_trl)):
        results[name] = r = fn(args, args.work, model_dir)
        print(f"{name:15s} first-step loss {r['first_loss']:.4f}  {r['pairs_per_s']:.2f} pairs/s  "
              f"wall {r['wall_s']:.0f}s  peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
    ours, trl = results["rl_stage1.py"], results["TRL DPOTrainer"]
    print(f"ratio (steady-state pairs/s): {ours['pairs_per_s'] / trl['pairs_per_s']:.2f}x")


if __name__ == "__main__":
    main()
