"""Bad input as a user meets it: every stage script run as a command on real toy files, through a catalogue of
bad data, flags, paths and outputs. Each case must exit 1 with its error as the last line of stderr, the only
line that says `error:`, naming the file:line, record, flag or path; print no traceback; and leave the files
it was given as they were (nothing written, nothing deleted; lock files aside). Then faults: kill -9 mid-run
and resume, for the stages that write incrementally: nothing lost, nothing written twice.

The scripts run as processes forked from tests/forkrun.py (conftest's `run`), which imports torch and
transformers once: a catalogue of fifty commands would otherwise spend four minutes starting Python.
"""
import fcntl
import json
import os
import re
import subprocess
import types

import pytest
from conftest import PY
from test_dpo import toy_pairs

import common


def make_adapter(base, out):
    """A LoRA adapter on `base`, saved as our stages save one (adapter_base.json records the base)."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(common.load_model(base), LoraConfig(r=2, target_modules=common.LM_ONLY_TARGETS))
    common.save_model(model, common.load_processor(base), str(out))
    return str(out)


@pytest.fixture(scope="module")
def world(toy, tmp_path_factory):
    """Good inputs for every stage (records, pairs, candidates, adapters) and some bad images."""
    from PIL import Image
    w = tmp_path_factory.mktemp("world")
    data = toy / "data"
    records = common.read_records(str(data / "train.jsonl"))[:8]
    common.write_jsonl(str(w / "train.jsonl"), records)
    candidates = []
    for r in records:
        wrong = [0, 0, 28, 28]
        candidates.append(dict(r, candidates=[
            {"box_text": common.box_to_text(r["bbox"], "viscot", 224, 168, 2), "box": r["bbox"],
             "crop": common.crop_box(r["bbox"], 224, 168, 28), "answer": r["answer"], "s_R": 1.0, "s_B": 1.0},
            {"box_text": common.box_to_text(wrong, "viscot", 224, 168, 2), "box": wrong, "crop": wrong,
             "answer": "no", "s_R": 0.0, "s_B": 0.0}]))
    common.write_jsonl(str(w / "cands.jsonl"), candidates)
    Image.new("RGB", (300, 200), "red").save(w / "big.png")
    (w / "corrupt.png").write_bytes((w / "big.png").read_bytes()[:200])  # a valid header, cut-off pixels
    (w / "notes").mkdir()
    (w / "notes" / "readme.txt").write_text("not a model")
    return types.SimpleNamespace(
        dir=w, root=str(data), model=str(toy / "qwen2-vl"), records=records, train=str(w / "train.jsonl"),
        pairs=toy_pairs(toy, w, n=8), cands=str(w / "cands.jsonl"), test=str(data / "test.jsonl"),
        corrupt=str(w / "corrupt.png"), notes=str(w / "notes"),
        own_adapter=make_adapter(str(toy / "qwen2-vl"), w / "own_adapter"),
        other_adapter=make_adapter(str(toy / "qwen2.5-vl"), w / "other_adapter"))


def lines_with(path, rows):
    """A JSONL file of rows; a row that is a str is written as is (bad JSON, bad bytes as latin-1)."""
    with open(path, "wb") as f:
        for row in rows:
            f.write(row.encode("latin-1") if isinstance(row, str) else json.dumps(row).encode())
            f.write(b"\n")
    return str(path)


def changed(W, tmp, n, change, drop=()):
    """W's training records with record n changed (a dict merged in, or keys dropped), written to tmp."""
    rows = [dict(r) for r in W.records]
    rows[n].update(change)
    for key in drop:
        rows[n].pop(key)
    return lines_with(tmp / "bad.jsonl", rows)


def sft(W, out, data=None, *extra):
    return ("sft.py", "--model", W.model, "--data", data or W.train, "--image_root", W.root, "--output_dir", out,
            "--max_steps", "1", "--batch_size", "2", "--finetune", "full", *extra)


def rl(W, out, data=None, *extra, script="rl_stage1.py"):
    return (script, "--model", W.model, "--data", data or W.pairs, "--image_root", W.root, "--output_dir", out,
            "--max_steps", "1", "--batch_size", "2", "--finetune", "full", "--eval_fraction", "0", *extra)


def grpo(W, out, data=None, *extra):
    return ("grpo.py", "--model", W.model, "--data", data or W.train, "--image_root", W.root, "--output_dir", out,
            "--max_steps", "1", "--num_generations", "2", "--max_new_tokens", "4", *extra)


def gen_pairs(W, out, data=None, *extra):
    return ("gen_pairs.py", "--model", W.model, "--data", data or W.train, "--image_root", W.root, "--out", out,
            "--attempts", "1", "--max_new_tokens", "4", *extra)


def infer(W, out, data=None, *extra):
    return ("infer.py", "--model", W.model, "--data", data or W.train, "--image_root", W.root, "--out", out,
            "--max_new_tokens", "4", *extra)


def filter_pairs(out, *candidates):
    return ("filter_pairs.py", "--candidates", *candidates, "--out", out)


def evaluate(W, out, protocol, questions, predictions):
    return ("eval.py", "--protocol", protocol, "--questions", questions, "--predictions", predictions, "--out", out,
            "--image_root", W.root)


def merge(W, out, *extra, model=None, adapter=None):
    return ("merge.py", "--model", model or W.model, "--adapter", adapter or W.own_adapter, "--out", out, *extra)


def used_output_dir(tmp):
    """An --output_dir with an earlier run's metrics and checkpoint in it."""
    (tmp / "out" / "checkpoint-1").mkdir(parents=True)
    (tmp / "out" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return tmp / "out"


def file_at(path):
    """A small file at path (its folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")
    return path


def checkpoint_of(tmp, stage, finetune="full", order=None, model=None, weights=None):
    """A checkpoint directory as another run leaves one: its weights those of the model folder `weights`, or
    none (the checks come first), its training state empty (as one cut short)."""
    import shutil
    ckpt = tmp / "ck" / "checkpoint-1"
    if weights:
        shutil.copytree(weights, ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "training_state.pt").write_bytes(b"")
    info = {"stage": stage, "finetune": finetune, "step": 1, "order": order}
    (ckpt / common.CHECKPOINT_INFO).write_text(json.dumps(info if model is None else dict(info, model=model)))
    return str(ckpt)


def model_cut_short(W, tmp):
    """A copy of the toy model whose weights file lost its second half."""
    import shutil
    shutil.copytree(W.model, tmp / "m")
    weights = tmp / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    return str(tmp / "m")


def earlier_run_holding(tmp, name, source):
    """A used --output_dir whose earlier run's `name` (a stage output) holds a copy of `source`, a file or a
    model folder: what this run reads from there, --overwrite would delete."""
    import shutil
    out = used_output_dir(tmp)
    (shutil.copytree if os.path.isdir(source) else shutil.copy)(source, out / name)
    return out


def thin_image_records(W, tmp):
    from PIL import Image
    Image.new("RGB", (2000, 8), "red").save(tmp / "thin.png")
    return changed(W, tmp, 2, {"image": str(tmp / "thin.png"), "width": 2000, "height": 8, "bbox": [0, 0, 100, 8]})


def broken_adapter(W, tmp):
    import shutil
    shutil.copytree(W.own_adapter, tmp / "adapter")
    (tmp / "adapter" / "adapter_base.json").write_text("{")
    return str(tmp / "adapter")


def two_datasets_one_name(W, tmp):
    for folder in ("a", "b"):
        lines_with(file_at(tmp / folder / "test.jsonl"), W.records)
    return ("eval.py", "--protocol", "chain", "--questions", tmp / "a" / "test.jsonl", tmp / "b" / "test.jsonl",
            "--predictions", W.train, W.train, "--out", tmp / "r.json", "--image_root", W.root)


def bad_score(W, tmp, **change):
    rows = common.read_jsonl(W.cands)
    rows[2]["candidates"][0].update(change)
    return lines_with(tmp / "cands.jsonl", rows)


# Each case: (name, builder(W, tmp) -> (command, regex the error line must match)). The builder writes what
# the command reads into tmp; the command's outputs go to tmp/out.
CASES = [
    # --- data files (every stage reads them through common.iter_jsonl / read_records / check_images)
    ("sft-not-utf8", lambda W, tmp: (sft(W, tmp / "out", lines_with(tmp / "bad.jsonl", [
        W.records[0], W.records[1], json.dumps(dict(W.records[2], question="caf\u00e9?"), ensure_ascii=False)])),
        r"bad\.jsonl:3: not UTF-8 text")),
    ("sft-empty-data", lambda W, tmp: (sft(W, tmp / "out", lines_with(tmp / "bad.jsonl", [])),
                                       r"bad\.jsonl: no records \(the file is empty\)")),
    ("sft-malformed-line", lambda W, tmp: (sft(W, tmp / "out", lines_with(tmp / "bad.jsonl", [
        W.records[0], '{"id": "x", "image": '])), r"bad\.jsonl:2: not valid JSON")),
    ("sft-line-not-object", lambda W, tmp: (sft(W, tmp / "out", lines_with(tmp / "bad.jsonl", [W.records[0],
                                                                                                "[1, 2]"])),
                                            r"bad\.jsonl:2: expected a JSON object, got list")),
    ("sft-missing-field", lambda W, tmp: (sft(W, tmp / "out", changed(W, tmp, 3, {}, drop=["question"])),
                                          r"bad\.jsonl:4: field 'question' must be a non-empty string")),
    ("sft-duplicate-id", lambda W, tmp: (sft(W, tmp / "out", changed(W, tmp, 5, {"id": W.records[1]["id"]})),
                                         r"bad\.jsonl:6: duplicate id 'train-1' \(first at .*bad\.jsonl:2\)")),
    ("sft-missing-image", lambda W, tmp: (sft(W, tmp / "out", changed(W, tmp, 2, {"image": "images/nope.png"})),
                                          r"record 'train-2': cannot load image .*nope\.png.*no such file")),
    ("sft-corrupt-image", lambda W, tmp: (sft(W, tmp / "out", changed(W, tmp, 7, {"image": W.corrupt, "width": 300,
                                                                                  "height": 200})),
                                          r"record 'train-7': cannot load image .*corrupt\.png")),
    ("sft-box-past-the-edge", lambda W, tmp: (sft(W, tmp / "out", changed(W, tmp, 1, {"bbox": [200, 10, 260, 40]})),
                                              r"bad\.jsonl:2: record 'train-1': bbox \[200, 10, 260, 40\] lies outside "
                                              r"the 224x168 image")),
    ("sft-negative-box", lambda W, tmp: (sft(W, tmp / "out", changed(W, tmp, 1, {"bbox": [-20, 10, 30, 40]})),
                                         r"bad\.jsonl:2: record 'train-1': bbox \[-20, 10, 30, 40\] lies outside "
                                         r"the 224x168 image")),
    ("sft-nan-box", lambda W, tmp: (sft(W, tmp / "out", changed(W, tmp, 1, {"bbox": [float("nan"), 10, 30, 40]})),
                                    r"bad\.jsonl:2: record 'train-1': bbox must be \[x1, y1, x2, y2\] finite numbers")),
    ("sft-size-not-the-image", lambda W, tmp: (sft(W, tmp / "out", changed(W, tmp, 4, {"width": 448, "height": 336})),
                                               r"record 'train-4': width/height 448x336 disagree with its image "
                                               r".*\(224x168\)")),
    ("sft-box-outside-the-real-image", lambda W, tmp: (
        sft(W, tmp / "out", changed(W, tmp, 4, {"bbox": [200, 150, 240, 180]}, drop=["width", "height"])),
        r"record 'train-4': bbox \[200, 150, 240, 180\] lies outside the 224x168 image")),
    # --- flags: refused by argparse before any model loads
    ("sft-batch-size-0", lambda W, tmp: (sft(W, tmp / "out", None, "--batch_size", "0"),
                                         r"argument --batch_size: 0 is outside \[1, inf\)")),
    ("sft-batch-size-negative", lambda W, tmp: (sft(W, tmp / "out", None, "--batch_size", "-2"),
                                                r"argument --batch_size: -2 is outside")),
    ("sft-grad-accum-0", lambda W, tmp: (sft(W, tmp / "out", None, "--grad_accum", "0"), r"argument --grad_accum: 0")),
    ("sft-lr-nan", lambda W, tmp: (sft(W, tmp / "out", None, "--lr", "nan"), r"argument --lr: nan is outside")),
    ("sft-warmup-ratio-2", lambda W, tmp: (sft(W, tmp / "out", None, "--warmup_ratio", "2"),
                                           r"argument --warmup_ratio: 2 is outside \[0, 1\]")),
    ("sft-steps-not-a-number", lambda W, tmp: (sft(W, tmp / "out", None, "--max_steps", "ten"),
                                               r"argument --max_steps: 'ten' is not an integer")),
    ("sft-seed-negative", lambda W, tmp: (sft(W, tmp / "out", None, "--seed", "-1"),
                                          r"argument --seed: -1 is outside \[0, ")),
    ("sft-output-dir-empty", lambda W, tmp: (sft(W, ""), r"--output_dir is empty")),
    ("sft-lora-targets-not-a-pattern", lambda W, tmp: (sft(W, tmp / "out", None, "--finetune", "lora",
                                                           "--lora_targets", "(q_proj"),
                                                       r"argument --lora_targets: '\(q_proj' is not a regular "
                                                       r"expression")),
    ("sft-lora-targets-match-nothing", lambda W, tmp: (sft(W, tmp / "out", None, "--finetune", "lora",
                                                           "--lora_targets", "nothing_proj"),
                                                       r"--lora_targets 'nothing_proj' matches no module of --model "
                                                       r".*qwen2-vl \(the default matches names like "
                                                       r"'model\.language_model\.layers\.0\.")),
    ("sft-deepspeed-config-missing", lambda W, tmp: (sft(W, tmp / "out", None, "--deepspeed", str(tmp / "ds.json")),
                                                     r"--deepspeed .*ds\.json: No such file")),
    ("sft-batch-over-the-data", lambda W, tmp: (sft(W, tmp / "out", None, "--batch_size", "100"),
                                                r"16 usable examples, fewer than one global batch of 100 "
                                                r"\(--batch_size 100 x --grad_accum 1 x 1 rank\(s\)\)")),
    ("sft-question-with-a-vision-token", lambda W, tmp: (sft(W, tmp / "out", changed(
        W, tmp, 3, {"question": "What is at <|image_pad|>?"})), r"bad\.jsonl:4: record 'train-3': question holds the "
                                                                 r"special token <\|image_pad\|>")),
    ("sft-image-too-thin", lambda W, tmp: (sft(W, tmp / "out", thin_image_records(W, tmp)),
                                           r"record 'train-2': image .*thin\.png' is 2000x8, a side over 200 times "
                                           r"the other")),
    ("sft-resume-another-stages-checkpoint", lambda W, tmp: (sft(W, tmp / "out", None, "--resume",
                                                                 checkpoint_of(tmp, "grpo")),
                                                             r"--resume .*checkpoint-1: a checkpoint of grpo, not of "
                                                             r"sft")),
    ("sft-resume-lora-checkpoint-with-full", lambda W, tmp: (sft(W, tmp / "out", None, "--resume",
                                                                 checkpoint_of(tmp, "sft", "lora")),
                                                             r"trained with --finetune lora, this run has --finetune "
                                                             r"full")),
    ("sft-fp16-without-deepspeed", lambda W, tmp: (sft(W, tmp / "out", None, "--dtype", "fp16"),
                                                   r"--dtype fp16 trains only under --deepspeed")),
    ("sft-resume-another-data-order", lambda W, tmp: (sft(W, tmp / "out", None, "--resume", checkpoint_of(
        tmp, "sft", order={"items": 16, "global_batch": 4, "seed": 5, "data": "0123456789abcdef"})),
        r"checkpoint-1: drawn in another data order \(global_batch 4 -> 2, seed 5 -> 42, data '0123456789abcdef' "
        r"-> '[0-9a-f]{16}'\), so the rest of the run would skip or repeat items")),
    # --- model paths, checkpoints, adapters
    ("sft-model-missing", lambda W, tmp: (sft(W, tmp / "out", None, "--model", str(tmp / "nope")),
                                          r"--model .*nope: no such directory")),
    ("sft-model-not-a-model", lambda W, tmp: (sft(W, tmp / "out", None, "--model", W.notes),
                                              r"--model .*notes: not a model directory \(no config\.json\)")),
    ("sft-model-is-an-adapter", lambda W, tmp: (sft(W, tmp / "out", None, "--model", W.own_adapter),
                                                r"--model .*own_adapter: a LoRA adapter, not a model: give its base "
                                                r"as --model and this as --adapter")),
    ("infer-adapter-is-a-model", lambda W, tmp: (infer(W, tmp / "p.jsonl", None, "--adapter", W.model),
                                                 r"--adapter .*qwen2-vl: not a PEFT adapter directory")),
    ("sft-model-not-a-hub-id", lambda W, tmp: (sft(W, tmp / "out", None, "--model", "qwen 2 vl"),
                                               r"--model qwen 2 vl: no such directory")),
    ("sft-resume-not-a-checkpoint", lambda W, tmp: (sft(W, tmp / "out", None, "--resume", W.notes),
                                                    r"--resume .*notes: not a checkpoint \(no training_state\.pt\)")),
    ("sft-adapter-of-another-base", lambda W, tmp: (sft(W, tmp / "out", None, "--finetune", "lora", "--adapter",
                                                        W.other_adapter),
                                                    r"--adapter .*other_adapter was trained on .*qwen2\.5-vl")),
    # --- outputs: a used --output_dir, one another run holds
    ("sft-used-output-dir", lambda W, tmp: (sft(W, used_output_dir(tmp)), r"--output_dir .*out holds an earlier run "
                                            r"\(checkpoint-1, metrics\.jsonl\): --resume latest continues it, "
                                            r"--overwrite replaces it")),
    ("grpo-used-output-dir", lambda W, tmp: (grpo(W, used_output_dir(tmp)), r"holds an earlier run")),
    ("sft-output-dir-is-a-file", lambda W, tmp: (sft(W, file_at(tmp / "out")), r"--output_dir .*out: a file, not a "
                                                                               r"directory")),
    ("sft-output-dir-under-a-file", lambda W, tmp: (sft(W, file_at(tmp / "f") / "out"),
                                                    r"--output_dir .*f/out: cannot create it \(Not a directory\)")),
    ("grpo-output-dir-under-a-file", lambda W, tmp: (grpo(W, file_at(tmp / "f") / "out"), r"cannot create it")),
    ("sft-overwrite-would-delete-its-model", lambda W, tmp: (
        sft(W, earlier_run_holding(tmp, "final", W.model), None, "--model", str(tmp / "out" / "final"), "--overwrite"),
        r"--model .*out/final is in .*out/final, which --overwrite would delete: move it out of --output_dir first")),
    ("grpo-overwrite-would-delete-its-data", lambda W, tmp: (
        grpo(W, earlier_run_holding(tmp, "samples.jsonl", W.train), str(tmp / "out" / "samples.jsonl"),
             "--overwrite"), r"--data .*out/samples\.jsonl is in .*, which --overwrite would delete")),
    ("sft-resume-and-overwrite", lambda W, tmp: (sft(W, used_output_dir(tmp), None, "--resume", "latest",
                                                     "--overwrite"),
                                                 r"--resume continues the run in --output_dir and --overwrite replaces "
                                                 r"it: give one")),
    ("sft-resume-from-another-model", lambda W, tmp: (sft(W, tmp / "out", None, "--resume", checkpoint_of(
        tmp, "sft", model=os.path.join(os.path.dirname(W.model), "qwen2.5-vl"))),
        r"--resume .*checkpoint-1: trained from --model .*qwen2\.5-vl, this run has --model .*qwen2-vl")),
    ("sft-resume-state-cut-short", lambda W, tmp: (sft(W, tmp / "out", None, "--resume", checkpoint_of(
        tmp, "sft", weights=W.model)), r"--resume: .*checkpoint-1/training_state\.pt is unreadable")),
    ("sft-model-weights-cut-short", lambda W, tmp: (sft(W, tmp / "out", None, "--model", model_cut_short(W, tmp)),
                                                    r"--model .*m: cannot load it")),
    # --- preference pairs
    ("rl1-duplicate-pair-id", lambda W, tmp: (rl(W, tmp / "out", lines_with(tmp / "p.jsonl", common.read_jsonl(
        W.pairs)[:3] + common.read_jsonl(W.pairs)[:1])), r"p\.jsonl:4: duplicate id 'train-0'")),
    ("rl1-empty-pairs", lambda W, tmp: (rl(W, tmp / "out", lines_with(tmp / "p.jsonl", [])), r"p\.jsonl: no pairs")),
    ("rl1-eval-pairs-share-ids", lambda W, tmp: (rl(W, tmp / "out", None, "--eval_data", W.pairs),
                                                 r"pairs\.jsonl: pair id 'train-0' is also in")),
    ("rl1-beta-0", lambda W, tmp: (rl(W, tmp / "out", None, "--beta", "0"),
                                   r"argument --beta: 0 is outside \(0, inf\)")),
    ("rl1-chosen-box-is-the-rejected-box", lambda W, tmp: (rl(W, tmp / "out", lines_with(tmp / "p.jsonl", [
        dict(p, rejected_box_text=p["chosen_box_text"]) if i == 4 else p
        for i, p in enumerate(common.read_jsonl(W.pairs))])), r"p\.jsonl:5: chosen_box_text and rejected_box_text "
                                                              r"are the same box")),
    ("rl1-empty-question", lambda W, tmp: (rl(W, tmp / "out", lines_with(tmp / "p.jsonl", [
        dict(p, question=" ") if i == 1 else p for i, p in enumerate(common.read_jsonl(W.pairs))])),
        r"p\.jsonl:2: field 'question' must be a non-empty string")),
    ("rl2-no-pair-has-answers", lambda W, tmp: (rl(W, tmp / "out", lines_with(tmp / "p.jsonl", [
        dict(p, chosen_answer=None) for p in common.read_jsonl(W.pairs)]), script="rl_stage2.py"),
        r"p\.jsonl: no pair has chosen_answer, rejected_answer and chosen_crop")),
    ("rl2-answer-not-a-string", lambda W, tmp: (rl(W, tmp / "out", lines_with(tmp / "p.jsonl", [
        dict(p, rejected_answer=3) if i == 2 else p for i, p in enumerate(common.read_jsonl(W.pairs))]),
        script="rl_stage2.py"), r"p\.jsonl:3: field 'rejected_answer' must be a string or null, got 3")),
    ("rl1-pair-width-a-string", lambda W, tmp: (rl(W, tmp / "out", lines_with(tmp / "p.jsonl", [
        dict(p, width="224") if i == 0 else p for i, p in enumerate(common.read_jsonl(W.pairs))])),
        r"record 'train-0': width/height must be positive integers, got '224' and 168")),
    ("rl2-zero-area-crop", lambda W, tmp: (rl(W, tmp / "out", lines_with(tmp / "p.jsonl", [
        dict(p, chosen_crop=[10, 10, 10, 40]) if i == 2 else p for i, p in enumerate(common.read_jsonl(W.pairs))]),
        script="rl_stage2.py"), r"p\.jsonl:3: chosen_crop \[10, 10, 10, 40\] is degenerate")),
    ("rl2-crop-outside", lambda W, tmp: (rl(W, tmp / "out", lines_with(tmp / "p.jsonl", [
        dict(p, chosen_crop=[100, 100, 300, 160]) if i == 1 else p for i, p in enumerate(common.read_jsonl(W.pairs))]),
        script="rl_stage2.py"), r"p\.jsonl:2: chosen_crop \[100, 100, 300, 160\] lies outside the 224x168 image")),
    # --- GRPO
    ("grpo-duplicate-id", lambda W, tmp: (grpo(W, tmp / "out", changed(W, tmp, 6, {"id": "train-0"})),
                                          r"bad\.jsonl:7: duplicate id 'train-0'")),
    ("grpo-empty-prompts", lambda W, tmp: (grpo(W, tmp / "out", lines_with(tmp / "bad.jsonl", [])), r"no prompts")),
    ("grpo-zoom-reward-without-zoom", lambda W, tmp: (grpo(W, tmp / "out", None, "--rewards", "answer,zoom_tool"),
                                                      r"reward\(s\) \['zoom_tool'\] score zoom calls: only --task "
                                                      r"zoom")),
    ("grpo-max-turns-without-zoom", lambda W, tmp: (grpo(W, tmp / "out", None, "--max_turns", "5"),
                                                    r"--max_turns only apply to --task zoom")),
    ("infer-max-context-without-zoom", lambda W, tmp: (infer(W, tmp / "p.jsonl", None, "--max_context", "500"),
                                                       r"--max_context only apply to --mode zoom and --serve")),
    ("eval-max-turns-without-zoom", lambda W, tmp: (evaluate(W, tmp / "r.json", "chain", W.train, W.train)
                                                    + ("--max_turns", "2"), r"--max_turns only apply to --protocol zoom")),
    ("grpo-math-verify-without-its-rewards", lambda W, tmp: (grpo(W, tmp / "out", None, "--math_verify"),
                                                             r"--math_verify applies to the det_iou, det_confidence, "
                                                             r"cls_virft rewards, none of them in --rewards")),
    ("grpo-temperature-0", lambda W, tmp: (grpo(W, tmp / "out", None, "--temperature", "0"),
                                           r"argument --temperature: 0 is outside \[1e-05, inf\)")),
    ("grpo-one-generation", lambda W, tmp: (grpo(W, tmp / "out", None, "--num_generations", "1"),
                                            r"argument --num_generations: 1 is outside \[2, inf\)")),
    ("grpo-answer-a-number", lambda W, tmp: (grpo(W, tmp / "out", changed(W, tmp, 2, {"answer": 3})),
                                             r"bad\.jsonl:3: 'answer' must be a non-empty string, got 3")),
    ("grpo-reward-reads-a-missing-field", lambda W, tmp: (grpo(W, tmp / "out", None, "--rewards", "answer,det_iou"),
                                                          r"train\.jsonl:1: the det_iou reward \(--rewards\) reads "
                                                          r"'solution', which this record lacks")),
    ("grpo-reward-weights-not-numbers", lambda W, tmp: (grpo(W, tmp / "out", None, "--reward_weights", "one"),
                                                        r"--reward_weights takes comma-separated finite numbers")),
    ("grpo-grounding-solution-without-a-box", lambda W, tmp: (grpo(W, tmp / "out", changed(
        W, tmp, 3, {"solution": "<answer>the red one</answer>"}, drop=["bbox"]), "--task", "grounding"),
        r"record 'train-3': solution '<answer>the red one</answer>' holds no viscot box")),
    ("grpo-grounding-solution-box-outside", lambda W, tmp: (grpo(W, tmp / "out", changed(
        W, tmp, 3, {"solution": "<answer>[0.50, 0.50, 3.00, 3.00]</answer>"}, drop=["bbox"]), "--task", "grounding"),
        r"record 'train-3': solution .*: its box \[.*\] lies outside the 224x168 image")),
    # --- self-evolution candidates and inference
    ("gen-pairs-attempts-0", lambda W, tmp: (gen_pairs(W, tmp / "c.jsonl", None, "--attempts", "0"),
                                             r"argument --attempts: 0 is outside")),
    ("gen-pairs-judge-url-not-a-url", lambda W, tmp: (gen_pairs(W, tmp / "c.jsonl", None, "--judge", "http",
                                                                "--judge_url", "notaurl", "--judge_model", "m"),
                                                      r"argument --judge_url: 'notaurl' is not an http:// or https:// "
                                                      r"URL with a host")),
    ("gen-pairs-empty-data", lambda W, tmp: (gen_pairs(W, tmp / "c.jsonl", lines_with(tmp / "bad.jsonl", [])),
                                             r"bad\.jsonl: no records")),
    ("gen-pairs-model-missing", lambda W, tmp: (gen_pairs(W, tmp / "c.jsonl", None, "--model", str(tmp / "m")),
                                                r"--model .*m: no such directory")),
    ("gen-pairs-judge-model-missing", lambda W, tmp: (gen_pairs(W, tmp / "c.jsonl", None, "--judge", "model",
                                                                "--judge_model", str(tmp / "j")),
                                                      r"--judge_model .*j: no such directory")),
    ("gen-pairs-out-is-the-data", lambda W, tmp: (gen_pairs(W, tmp / "d.jsonl", lines_with(tmp / "d.jsonl",
                                                                                           W.records)),
                                                  r"--out .*d\.jsonl: .*d\.jsonl is also an input of this run")),
    ("infer-serve-with-batch-flags", lambda W, tmp: (infer(W, tmp / "p.jsonl", None, "--serve"),
                                                     r"--serve answers each request by its own model name .*: "
                                                     r"--data, --out would be ignored")),
    ("infer-gt-box-without-data", lambda W, tmp: (("infer.py", "--model", W.model, "--image", tmp / "x.png",
                                                   "--question", "What shape?", "--mode", "gt_box"),
                                                  r"--mode gt_box crops each record's annotated bbox: give --data")),
    ("infer-out-is-the-data", lambda W, tmp: (infer(W, tmp / "d.jsonl", lines_with(tmp / "d.jsonl", W.records)),
                                              r"--out .*d\.jsonl: .*d\.jsonl is also an input of this run")),
    ("infer-out-is-another-file", lambda W, tmp: (infer(W, lines_with(tmp / "test.jsonl", W.records[:2])),
                                                  r"--out .*test\.jsonl exists and is no earlier run's output \(no "
                                                  r".*test\.jsonl\.made_by\.json beside it\)")),
    ("infer-out-is-a-directory", lambda W, tmp: (infer(W, file_at(tmp / "p" / "x").parent),
                                                 r"--out .*p: a directory, not a file")),
    ("infer-image-missing", lambda W, tmp: (("infer.py", "--model", W.model, "--image", tmp / "nope.png",
                                             "--question", "What shape?"), r"cannot load image '.*nope\.png'")),
    ("infer-out-empty", lambda W, tmp: (infer(W, ""), r"--out is empty")),
    ("infer-out-under-a-file", lambda W, tmp: (infer(W, file_at(tmp / "f") / "p.jsonl"),
                                               r"--out .*f: cannot create it")),
    ("infer-batch-size-0", lambda W, tmp: (infer(W, tmp / "p.jsonl", None, "--batch_size", "0"),
                                           r"argument --batch_size: 0")),
    ("infer-empty-data", lambda W, tmp: (infer(W, tmp / "p.jsonl", lines_with(tmp / "bad.jsonl", [])),
                                         r"bad\.jsonl: no records")),
    ("infer-gt-box-without-a-box", lambda W, tmp: (infer(W, tmp / "p.jsonl", changed(W, tmp, 5, {}, drop=["bbox"]),
                                                         "--mode", "gt_box", "--batch_size", "2"),
                                                   r"bad\.jsonl: record 'train-5': --mode gt_box needs a bbox")),
    ("infer-adapter-of-another-base", lambda W, tmp: (infer(W, tmp / "p.jsonl", None, "--adapter", W.other_adapter),
                                                      r"--adapter .*other_adapter was trained on")),
    ("gen-pairs-adapter-of-another-base", lambda W, tmp: (gen_pairs(W, tmp / "c.jsonl", None, "--adapter",
                                                                    W.other_adapter), r"--adapter .*other_adapter was "
                                                                                      r"trained on")),
    ("grpo-adapter-of-another-base", lambda W, tmp: (grpo(W, tmp / "out", None, "--finetune", "lora", "--adapter",
                                                          W.other_adapter),
                                                     r"--adapter .*other_adapter was trained on")),
    ("rl1-adapter-of-another-base", lambda W, tmp: (rl(W, tmp / "out", None, "--finetune", "lora", "--adapter",
                                                       W.other_adapter), r"--adapter .*other_adapter was trained on")),
    ("eval-adapter-of-another-base", lambda W, tmp: (
        ("eval.py", "--protocol", "chain", "--questions", W.train, "--model", W.model, "--adapter", W.other_adapter,
         "--out", tmp / "r.json", "--image_root", W.root), r"--adapter .*other_adapter was trained on")),
    # --- pairs from candidates
    ("filter-score-not-a-number", lambda W, tmp: (filter_pairs(tmp / "p.jsonl", bad_score(W, tmp, s_R="high")),
                                                  r"cands\.jsonl:3: question 'train-2': candidate 0: s_R must be a "
                                                  r"finite number in \[0, 1\] or null, got 'high'")),
    ("filter-score-infinite", lambda W, tmp: (filter_pairs(tmp / "p.jsonl", bad_score(W, tmp, s_B=float("inf"))),
                                              r"cands\.jsonl:3: .*s_B must be a finite number .*got inf")),
    ("filter-line-not-object", lambda W, tmp: (filter_pairs(tmp / "p.jsonl", lines_with(tmp / "c.jsonl", ['"text"'])),
                                               r"c\.jsonl:1: expected a JSON object, got str")),
    ("filter-question-without-width", lambda W, tmp: (filter_pairs(tmp / "p.jsonl", lines_with(tmp / "c.jsonl", [
        {k: v for k, v in q.items() if k != "width"} for q in common.read_jsonl(W.cands)])),
        r"c\.jsonl:1: question 'train-0': width must be a positive integer, got None")),
    ("filter-candidates-given-twice", lambda W, tmp: (filter_pairs(tmp / "p.jsonl", W.cands, W.cands),
                                                      r"cands\.jsonl:1: duplicate id 'train-0' \(first at "
                                                      r".*cands\.jsonl:1\)")),
    ("filter-empty-candidates", lambda W, tmp: (filter_pairs(tmp / "p.jsonl", lines_with(tmp / "c.jsonl", [])),
                                                r"c\.jsonl: no questions")),
    ("filter-out-is-its-input", lambda W, tmp: (
        filter_pairs(tmp / "c.jsonl", lines_with(tmp / "c.jsonl", common.read_jsonl(W.cands))),
        r"--out .*c\.jsonl: .*c\.jsonl is also an input of this run: writing it would destroy the input")),
    ("filter-out-exists", lambda W, tmp: (filter_pairs(file_at(tmp / "p.jsonl"), W.cands),
                                          r"--out .*p\.jsonl exists: --overwrite replaces it, or write elsewhere")),
    ("filter-out-is-a-directory", lambda W, tmp: (filter_pairs(file_at(tmp / "p" / "x").parent, W.cands),
                                                  r"--out .*p: a directory, not a file")),
    ("filter-chosen-box-text-null", lambda W, tmp: (filter_pairs(tmp / "p.jsonl", bad_score(W, tmp, box_text=None)),
                                                    r"cands\.jsonl:3: question 'train-2': scored candidate 0: "
                                                    r"box_text must be a string")),
    ("filter-box-text-with-a-vision-token", lambda W, tmp: (
        filter_pairs(tmp / "p.jsonl", bad_score(W, tmp, box_text="<|image_pad|>")),
        r"cands\.jsonl:3: question 'train-2': scored candidate 0: box_text holds the special token <\|image_pad\|>")),
    ("filter-out-under-a-file", lambda W, tmp: (filter_pairs(file_at(tmp / "f") / "p.jsonl", W.cands),
                                                r"--out .*f: cannot create it")),
    ("filter-crop-not-a-box", lambda W, tmp: (filter_pairs(tmp / "p.jsonl", bad_score(W, tmp, crop="nonsense")),
                                              r"cands\.jsonl:3: .*candidate 0: crop must be \[x1, y1, x2, y2\]")),
    ("filter-every-question-dropped", lambda W, tmp: (filter_pairs(tmp / "p.jsonl", lines_with(tmp / "c.jsonl", [
        dict(q, candidates=q["candidates"][:1]) for q in common.read_jsonl(W.cands)])),
        r"none of the 8 questions passed the rules \(table above\): no pairs to write")),
    ("filter-grpo-out-is-out", lambda W, tmp: (filter_pairs(tmp / "p.jsonl", W.cands) + ("--grpo_out", tmp / "p.jsonl"),
                                               r"--grpo_out .*p\.jsonl is --out too")),
    # --- evaluation
    ("eval-chain-record-without-question", lambda W, tmp: (evaluate(W, tmp / "r.json", "chain", changed(
        W, tmp, 0, {}, drop=["question"]), W.train), r"bad\.jsonl:1: field 'question' must be a non-empty string")),
    ("eval-grounding-unparsable-truth", lambda W, tmp: (evaluate(W, tmp / "r.json", "grounding", changed(
        W, tmp, 2, {"bbox": "[1, 2, 3, 4]"}), W.train), r"bad\.jsonl: row 3 \('train-2'\): bbox must be \[x1")),
    ("eval-chain-record-without-bbox-before-inference", lambda W, tmp: (
        ("eval.py", "--protocol", "chain", "--questions", changed(W, tmp, 1, {}, drop=["bbox"]), "--model", W.model,
         "--out", tmp / "r.json", "--image_root", W.root),
        r"bad\.jsonl: row 2 \('train-1'\) has no bbox \(the chain protocol scores the model's box against it\)")),
    ("eval-empty-questions", lambda W, tmp: (evaluate(W, tmp / "r.json", "chain", lines_with(tmp / "q.jsonl", []),
                                                      W.train), r"q\.jsonl: no records")),
    ("eval-virft-det-without-images", lambda W, tmp: (evaluate(W, tmp / "r.json", "virft-det", file_at(
        tmp / "coco.json"), W.train), r"coco\.json: no questions \(a COCO file with images")),
    ("eval-native-box-format-without-model", lambda W, tmp: (evaluate(W, tmp / "r.json", "chain", W.train, W.train)
                                                             + ("--box_format", "native"),
                                                             r"--box_format native takes the format of --model")),
    ("eval-empty-predictions", lambda W, tmp: (evaluate(W, tmp / "r.json", "chain", W.train,
                                                        lines_with(tmp / "p.jsonl", [])), r"p\.jsonl: no predictions")),
    ("eval-out-is-the-predictions", lambda W, tmp: (evaluate(W, tmp / "p.jsonl", "chain", W.train, lines_with(
        tmp / "p.jsonl", W.records)), r"--out .*p\.jsonl: .*p\.jsonl is also an input of this run")),
    ("eval-items-file-is-the-questions", lambda W, tmp: (evaluate(W, tmp / "q.json", "chain", lines_with(
        tmp / "q.items.jsonl", W.records), W.train), r"--out .*q\.json: .*q\.items\.jsonl is also an input")),
    ("eval-two-datasets-one-name", lambda W, tmp: (two_datasets_one_name(W, tmp),
                                                   r"--questions .*a/test\.jsonl and .*b/test\.jsonl are both dataset "
                                                   r"'test' \(named by the file\): rename one")),
    ("eval-predictions-of-another-file", lambda W, tmp: (evaluate(W, tmp / "r.json", "grounding", W.train, lines_with(
        tmp / "p.jsonl", [{"id": "test-0", "box": [1, 2, 3, 4]}])), r"p\.jsonl: 1 prediction ids name no question "
                                                                     r"of .*train\.jsonl \(first: 'test-0'\)")),
    ("eval-repeated-question-id", lambda W, tmp: (evaluate(W, tmp / "r.json", "grounding", lines_with(
        tmp / "q.jsonl", W.records + W.records[:1]), W.train), r"q\.jsonl: row 9 repeats id 'train-0'")),
    ("eval-out-is-not-a-report", lambda W, tmp: (evaluate(W, file_at(tmp / "notes.json"), "chain", W.train, W.train),
                                                 r"--out .*notes\.json exists and is not an eval\.py report")),
    ("eval-label-of-another-type", lambda W, tmp: (evaluate(W, tmp / "r.json", "virft-cls", lines_with(
        tmp / "q.jsonl", [dict(W.records[0], solution=5)]), lines_with(tmp / "p.jsonl", [
            {"id": "train-0", "text": "<answer>circle</answer>"}])),
        r"q\.jsonl / .*p\.jsonl: a row lacks a field the virft-cls protocol reads, or holds one of another type "
        r"\(\w+Error: ")),
    ("eval-out-under-a-file", lambda W, tmp: (evaluate(W, file_at(tmp / "f") / "r.json", "chain", W.train, W.train),
                                              r"--out .*f: cannot create it")),
    ("eval-viscot-det-in-another-format", lambda W, tmp: (evaluate(W, tmp / "r.json", "viscot-det", W.train, W.train)
                                                          + ("--box_format", "qwen3"),
                                                          r"--protocol viscot-det scores Visual-CoT's box text "
                                                          r"\(--box_format viscot\), not qwen3")),
    ("eval-viscot-det-model-native-format", lambda W, tmp: (
        ("eval.py", "--protocol", "viscot-det", "--questions", W.train, "--model", W.model, "--box_format", "native",
         "--out", tmp / "r.json"), r"not qwen2 \(--model's native format\): score another format with --protocol "
                                   r"grounding")),
    ("eval-batch-size-0", lambda W, tmp: (evaluate(W, tmp / "r.json", "chain", W.train, W.train)
                                          + ("--batch_size", "0"), r"argument --batch_size: 0")),
    # --- merge
    ("merge-out-holds-other-files", lambda W, tmp: (merge(W, file_at(tmp / "out" / "mine.txt").parent),
                                                    r"--out .*out holds files merge\.py did not write "
                                                    r"\(mine\.txt\); give a new or "
                                                    r"empty directory")),
    ("merge-out-is-an-earlier-merge", lambda W, tmp: (merge(W, file_at(tmp / "out" / "merge.json").parent),
                                                      r"--out .*out holds an earlier merge; --overwrite replaces it")),
    ("merge-out-under-a-file", lambda W, tmp: (merge(W, file_at(tmp / "f") / "m"),
                                               r"--out .*f/m: .*f is a file, not a directory")),
    ("merge-adapter-missing", lambda W, tmp: (merge(W, tmp / "out", adapter=str(tmp / "nope")),
                                              r"--adapter .*nope is not a PEFT adapter directory")),
    ("merge-model-missing", lambda W, tmp: (merge(W, tmp / "out", model=str(tmp / "base")),
                                            r"--model .*base: no such directory")),
    ("merge-adapter-of-another-base", lambda W, tmp: (merge(W, tmp / "out", adapter=W.other_adapter),
                                                      r"--adapter .*other_adapter was trained on")),
    ("merge-adapter-base-unreadable", lambda W, tmp: (merge(W, tmp / "out", adapter=broken_adapter(W, tmp)),
                                                      r"--adapter .*adapter: unreadable adapter_base\.json")),
    ("merge-shard-size-not-a-size", lambda W, tmp: (merge(W, tmp / "out", "--max_shard_size", "banana"),
                                                    r"argument --max_shard_size: 'banana' is not a size")),
]


def snapshot(root):
    """Every folder under root, and every file with its size and modification time; lock files aside."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        out.update({os.path.relpath(os.path.join(dirpath, d), root): "folder" for d in dirs})
        for name in files:
            if not name.endswith(".lock"):
                st = os.stat(os.path.join(dirpath, name))
                out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("name,build", CASES, ids=[c[0] for c in CASES])
def test_catalogue(run, world, tmp_path, name, build):
    command, message = build(world, tmp_path)
    before = snapshot(tmp_path)
    p = run(*command)
    script = os.path.basename(command[0])
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.rc == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert lines[-1].startswith(f"{script}: error: ") and re.search(message, lines[-1]), lines[-1]
    assert sum("error:" in line for line in lines) == 1, p.stderr[-3000:]
    assert snapshot(tmp_path) == before, "the failed command wrote or deleted files"


def hold(path):
    """Another run's lock on path (the test process holds it), with its pid in it."""
    f = open(path, "a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.write("pid 4242 on elsewhere\n")
    f.flush()
    return f


SECOND_RUNS = {  # stage -> (command on tmp's output, the lock a first run holds)
    "sft": lambda W, tmp: (sft(W, tmp / "out"), tmp / "out" / "run.lock"),
    "rl_stage1": lambda W, tmp: (rl(W, tmp / "out"), tmp / "out" / "run.lock"),
    "grpo": lambda W, tmp: (grpo(W, tmp / "out"), tmp / "out" / "run.lock"),
    "gen_pairs": lambda W, tmp: (gen_pairs(W, tmp / "o.jsonl"), tmp / "o.jsonl.lock"),
    "infer": lambda W, tmp: (infer(W, tmp / "o.jsonl"), tmp / "o.jsonl.lock"),
    "filter_pairs": lambda W, tmp: (filter_pairs(tmp / "o.jsonl", W.cands), tmp / "o.jsonl.lock"),
    "eval": lambda W, tmp: (evaluate(W, tmp / "o.jsonl", "chain", W.train, W.train), tmp / "o.jsonl.lock"),
}


@pytest.mark.parametrize("stage", SECOND_RUNS)
def test_a_second_run_on_the_same_output_is_refused_with_the_first_ones_pid(run, world, tmp_path, stage):
    command, lock = SECOND_RUNS[stage](world, tmp_path)
    lock.parent.mkdir(exist_ok=True)
    with hold(lock):
        p = run(*command)
    assert p.rc == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert re.search(r"is in use by another run \(pid 4242 on elsewhere, lock .*\); wait for it or write "
                     r"elsewhere", p.stderr.splitlines()[-1])
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "out" / "metrics.jsonl").exists()


def test_overwrite_replaces_only_what_a_stage_writes(run, world, tmp_path):
    used_output_dir(tmp_path)
    (tmp_path / "out" / "notes.txt").write_text("mine")
    p = run(*sft(world, tmp_path / "out", None, "--overwrite"))
    assert p.rc == 0, p.stderr[-3000:]
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert [r["step"] for r in common.read_jsonl(str(tmp_path / "out" / "metrics.jsonl"))] == [1]
    assert not (tmp_path / "out" / "checkpoint-1" / "mine").exists()
    assert (tmp_path / "out" / "final" / "config.json").exists()


def test_file_outputs_are_replaced_only_when_asked(run, world, tmp_path):
    """filter_pairs.py replaces an existing --out only with --overwrite; eval.py rewrites its own report (a
    re-score of the same predictions gives the same report)."""
    out = file_at(tmp_path / "p.jsonl")
    p = run(*filter_pairs(out, world.cands), "--overwrite")
    assert p.rc == 0, p.stderr[-3000:]
    assert len(common.read_jsonl(str(out))) == len(world.records)
    report, texts = tmp_path / "r.json", []
    for _ in range(2):
        p = run(*evaluate(world, report, "chain", world.train, world.train))
        assert p.rc == 0, p.stderr[-3000:]
        texts.append(report.read_text())
    assert texts[0] == texts[1]


def test_merge_replaces_its_own_output_with_overwrite_and_nothing_else(run, world, tmp_path):
    """--overwrite replaces an earlier merge, and refuses one that a file was added to since (its marker lists
    what merge.py wrote): replacing --out would delete that file."""
    out = tmp_path / "merged"
    assert run(*merge(world, out)).rc == 0
    marker = json.loads((out / "merge.json").read_text())
    assert marker["adapter"] == world.own_adapter and sorted(marker["files"]) == sorted(os.listdir(out))
    (out / "notes.txt").write_text("mine")
    p = run(*merge(world, out, "--overwrite"))
    assert p.rc == 1 and "Traceback" not in p.stderr
    assert re.search(r"--out .*merged holds files merge\.py did not write \(notes\.txt\)", p.stderr.splitlines()[-1])
    assert (out / "notes.txt").read_text() == "mine" and (out / "merge.json").exists()
    (out / "notes.txt").unlink()
    assert run(*merge(world, out, "--overwrite")).rc == 0
    assert sorted(os.listdir(tmp_path)) == ["merged"], "a temporary directory was left behind"


@pytest.mark.parametrize("stage", ["gen_pairs", "infer"])
def test_a_record_whose_box_or_size_disagrees_with_its_image_is_listed_and_the_rest_answered(run, world, tmp_path,
                                                                                            stage):
    """A box checked against the record's own width/height is refused at the start (the catalogue); one that
    only the image file shows wrong (no width/height given, or ones the file disagrees with) is found when the
    image loads: gen_pairs.py and infer.py then go on (a long job is not lost to one bad record), never answer
    it, name it and why in OUT.errors.jsonl, count it in the summary, and then exit 1 with one line naming
    the list."""
    no_size = {k: v for k, v in world.records[2].items() if k not in ("width", "height")}
    data = lines_with(tmp_path / "bad.jsonl", [
        dict(no_size, bbox=[200, 150, 240, 180]) if i == 2 else dict(r, width=448, height=336) if i == 5 else r
        for i, r in enumerate(world.records)])
    out = tmp_path / "o.jsonl"
    command = gen_pairs(world, out, data) if stage == "gen_pairs" else infer(world, out, data, "--mode", "gt_box")
    p = run(*command)
    assert p.rc == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert re.fullmatch(rf"{stage}\.py: error: 2 (question|record)\(s\) not answered: .*listed in "
                        rf"{re.escape(str(out))}\.errors\.jsonl.*", p.stderr.strip().splitlines()[-1])
    errors = {e["id"]: e["error"] for e in common.read_jsonl(str(out) + ".errors.jsonl")}
    assert errors.keys() == {"train-2", "train-5"}
    assert "lies outside the 224x168 image" in errors["train-2"] and "448x336 disagree" in errors["train-5"]
    assert sorted(r["id"] for r in common.read_jsonl(str(out))) == sorted(
        r["id"] for i, r in enumerate(world.records) if i not in (2, 5))
    assert re.search(r"2 (image )?errors", p.stdout + p.stderr)


def test_eval_counts_a_nan_box_as_unparsable_and_writes_valid_json(run, world, tmp_path):
    preds = [{"id": r["id"], "box": [float("nan"), 1, 2, 3] if i == 0 else r["bbox"], "answer": r["answer"]}
             for i, r in enumerate(world.records)]
    p = run(*evaluate(world, tmp_path / "r.json", "chain", world.train, lines_with(tmp_path / "p.jsonl", preds)))
    assert p.rc == 0, p.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the report"))
    assert report["parseable"] == pytest.approx(7 / 8) and report["box_acc"] == pytest.approx(7 / 8)


# ----------------------------------------------------------------------------------- kill -9 and resume

def metric_steps(out, key="loss"):
    return [r["step"] for r in common.read_jsonl(str(out / "metrics.jsonl")) if key in r]


def same_rows(got, want, drop=("samples_per_s", "tokens_per_s", "pairs_per_s", "generation_share")):
    """Metric lines equal but for timings."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        a, b = ({k: v for k, v in r.items() if k not in drop} for r in (a, b))
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)


# (stage, file, lines): the kill lands once the file has that many lines. metrics.jsonl's third step line comes
# after the step-2 checkpoint, so the resumed run starts from a checkpoint with a later line to drop (grpo's
# first line is its step-0 evaluation); reference_logps.jsonl's first line comes during the reference pass.
FAULTS = [("rl_stage2", "metrics.jsonl", 3), ("rl_stage2", "reference_logps.jsonl", 1), ("grpo", "metrics.jsonl", 4)]


@pytest.mark.parametrize("stage,fault,lines", FAULTS, ids=[f"{s}-{f}" for s, f, _ in FAULTS])
def test_kill_mid_run_and_resume_gives_the_uninterrupted_run(run, world, tmp_path, stage, fault, lines):
    """Killed after its step-2 checkpoint, or during the reference pass (rl), and rerun with --resume latest:
    every metric line of the whole run once, each equal to an uninterrupted run's (the killed run's lines
    after its checkpoint are dropped; reference log-probs already written are kept, the rest computed)."""
    def command(out, *extra):
        if stage == "rl_stage2":
            return rl(world, out, None, "--max_steps", "6", "--save_steps", "2", "--lr", "1e-3", "--batch_size", "1",
                      *extra, script="rl_stage2.py")
        return grpo(world, out, None, "--max_steps", "4", "--save_steps", "2", "--lr", "1e-3", "--task", "grounding",
                    "--batch_size", "2", "--num_generations", "4", "--seed", "3", "--eval_data", world.test, *extra)

    assert run(*command(tmp_path / "whole")).rc == 0
    killed = run(*command(tmp_path / "cut"), kill_when=(tmp_path / "cut" / fault, lines))
    assert killed.rc == -9, killed.stderr[-2000:]
    assert not (tmp_path / "cut" / "final").exists()
    resumed = run(*command(tmp_path / "cut", "--resume", "latest"))
    assert resumed.rc == 0, resumed.stderr[-3000:]
    if fault == "metrics.jsonl":
        assert re.search(r"resuming at step [24]", resumed.stdout), resumed.stdout
    same_rows(common.read_jsonl(str(tmp_path / "cut" / "metrics.jsonl")),
              common.read_jsonl(str(tmp_path / "whole" / "metrics.jsonl")))
    if stage == "rl_stage2":  # every unit's reference log-probs once: 8 pairs x (box, answer)
        keys = [r["key"] for r in common.read_jsonl(str(tmp_path / "cut" / "reference_logps.jsonl"))]
        assert sorted(keys) == sorted(set(keys)) and len(keys) == 16


@pytest.mark.parametrize("mode", ["chain", "zoom"])
def test_infer_kill_and_rerun_answers_every_record_once(run, world, tmp_path, toy, mode):
    data = str(toy / "data" / "test.jsonl")
    out = tmp_path / "preds.jsonl"
    command = infer(world, out, data, "--batch_size", "2", "--mode", mode)
    assert run(*command, kill_when=(out, 4)).rc == -9
    before = out.read_text().splitlines()
    assert 4 <= len(before) < 16, "the kill did not land mid-run"
    assert run(*command).rc == 0
    rows = common.read_jsonl(str(out))
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(r["id"] for r in common.read_records(data)) and len(set(ids)) == len(ids)
    assert out.read_text().splitlines()[:len(before) - 1] == before[:len(before) - 1]  # the last may be torn


def test_the_fork_runner_behaves_as_python_does(run, tmp_path):
    """Exit status, stdout, stderr and the traceback of an uncaught exception, as `python script.py`."""
    script = tmp_path / "s.py"
    script.write_text("import sys\nprint('out', sys.argv[1:])\nif sys.argv[1] == 'raise':\n    raise KeyError('k')\n"
                      "sys.exit(sys.argv[1] if sys.argv[1] != '3' else 3)\n")
    for arg in ("raise", "3", "message"):
        want = subprocess.run([PY, str(script), arg], capture_output=True, text=True)
        got = run(str(script), arg)
        assert (got.rc, got.stdout, got.stderr) == (want.returncode, want.stdout, want.stderr)


def test_rerun_with_other_weights_into_the_same_predictions_is_refused(run, world, tmp_path):
    out = tmp_path / "preds.jsonl"
    assert run(*infer(world, out, None, "--batch_size", "8")).rc == 0
    p = run(*infer(world, out, None, "--adapter", world.own_adapter))
    assert p.rc == 1 and re.search(r"preds\.jsonl\.made_by\.json: the outputs next to it were made with "
                                           r"other adapter, adapter_weights", p.stderr), p.stderr[-2000:]
    # The same questions from another file (the same ids) are other data: their old answers must not stand in.
    p = run(*infer(world, out, lines_with(tmp_path / "other.jsonl", world.records)))
    assert p.rc == 1 and re.search(r"made with other data \(", p.stderr), p.stderr[-2000:]
