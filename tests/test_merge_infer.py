"""merge.py (logits equality, reload, greedy text, refusing a wrong base) and infer.py (batched equals one
by one in every mode, incremental output with resume after a torn line, image errors, the CLI)."""
import json
import os
import sys

import pytest
import torch
from conftest import ROOT, run_script
from PIL import Image

import common
import infer
import merge


@pytest.fixture(scope="module")
def adapter(toy, tmp_path_factory):
    """A LoRA adapter with random, non-zero B on the toy Qwen2-VL, saved as our stages save adapters."""
    from peft import LoraConfig, get_peft_model
    base = str(toy / "qwen2-vl")
    torch.manual_seed(0)
    model = get_peft_model(common.load_model(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                               target_modules=common.LM_ONLY_TARGETS))
    out = str(tmp_path_factory.mktemp("adapter"))
    common.save_model(model, common.load_processor(base), out)
    return out


def toy_examples(toy, n=3):
    recs = common.read_records(str(toy / "data" / "train.jsonl"))[:n]
    root = str(toy / "data")
    return [common.Example(r, root, common.answer_messages(r["question"]),
                           crop=common.crop_box(r["bbox"], 168, 112, 28))
            for r in recs]


def test_merge_equals_adapter_and_reloads(toy, adapter, tmp_path, capsys):
    base = str(toy / "qwen2-vl")
    merge.main(["--model", base, "--adapter", adapter, "--out", str(tmp_path / "merged")])
    assert "adapter vs merged logits" in capsys.readouterr().out
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja",
                 "preprocessor_config.json"):
        assert (tmp_path / "merged" / name).exists(), name
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    with_adapter = common.load_model(base, adapter=adapter).eval()
    merged = common.load_model(str(tmp_path / "merged")).eval()
    processor = common.load_processor(str(tmp_path / "merged"))
    batch = common.collate([common.encode(processor, ex) for ex in toy_examples(toy)],
                           processor.tokenizer.pad_token_id)
    a, b = merge.logits(with_adapter, batch), merge.logits(merged, batch)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert (a - merge.logits(common.load_model(base).eval(), batch)).abs().max() > 1e-2  # the adapter matters
    greedy = [common.generate(m, processor, toy_examples(toy), max_new_tokens=12) for m in (with_adapter, merged)]
    assert greedy[0] == greedy[1]


def test_merge_saves_in_requested_dtype_and_its_reload_check_holds_there(toy, adapter, tmp_path, capsys):
    # The reload check compares the saved bf16 checkpoint with the in-memory merged model in bf16: the same
    # weights, and RoPE's unsaved inv_freq left in float32 on both sides (cast to bf16 in memory, it alone
    # moved the logits by 3e-2 of the largest and failed the default tolerance).
    merge.main(["--model", str(toy / "qwen2-vl"), "--adapter", adapter, "--out", str(tmp_path / "m"),
                "--dtype", "bf16"])
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    reload_line = [line for line in capsys.readouterr().out.splitlines() if "reloaded checkpoint" in line][0]
    assert float(reload_line.rsplit("= ", 1)[1]) == 0.0, reload_line


def test_a_failed_reload_check_leaves_out_as_it_was(toy, adapter, tmp_path, monkeypatch):
    merge.main(["--model", str(toy / "qwen2-vl"), "--adapter", adapter, "--out", str(tmp_path / "m")])
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    real_load = common.load_model

    def corrupted(path, *a, **kw):  # the saved checkpoint (written to a hidden .m.* folder), read back wrong
        model = real_load(path, *a, **kw)
        if os.path.basename(path).startswith(".m."):
            with torch.no_grad():
                next(model.parameters()).add_(1.0)
        return model

    monkeypatch.setattr(common, "load_model", corrupted)
    with pytest.raises(SystemExit, match="does not reproduce the merged model .*--out left as it was"):
        merge.main(["--model", str(toy / "qwen2-vl"), "--adapter", adapter, "--out", str(tmp_path / "m"),
                    "--overwrite"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no hidden copies left beside it


def test_merge_refuses_another_base(toy, adapter, tmp_path):
    with pytest.raises(common.DataError, match="--adapter .* was trained on .*qwen2-vl.*has other weights"):
        merge.main(["--model", str(toy / "qwen2.5-vl"), "--adapter", adapter, "--out", str(tmp_path / "m")])
    with pytest.raises(SystemExit, match="is not a PEFT adapter directory"):
        merge.main(["--model", str(toy / "qwen2-vl"), "--adapter", str(toy / "qwen2-vl"), "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------------------- infer

@pytest.fixture(scope="module")
def loaded(toy):
    path = str(toy / "qwen2-vl")
    return common.load_model(path).eval(), common.load_processor(path)


def mixed_records(toy, tmp_path):
    """Records whose images differ in size (so sequences differ in length and need padding), with boxes."""
    recs = common.read_records(str(toy / "data" / "train.jsonl"))[:5]
    out = []
    for i, (rec, size) in enumerate(zip(recs, [(168, 112), (224, 140), (112, 112), (280, 84), (168, 112)])):
        im = common.load_image(rec, str(toy / "data")).resize(size)
        im.save(tmp_path / f"{i}.png")
        out.append(dict(rec, image=f"{i}.png", width=size[0], height=size[1],
                        bbox=[size[0] * 0.1 * i, size[1] * 0.1, size[0] * (0.3 + 0.1 * i), size[1] * 0.6]))
    return out


@pytest.mark.parametrize("mode", ["chain", "gt_box", "direct", "focus"])
def test_batched_equals_one_by_one(loaded, toy, tmp_path, mode):
    model, processor = loaded
    recs = mixed_records(toy, tmp_path)
    images = [common.load_image(r, str(tmp_path)) for r in recs]
    kw = dict(mode=mode, max_new_tokens=10)
    batched = infer.run_batch(model, processor, recs, images, **kw)
    single = [infer.run_batch(model, processor, [r], [im], **kw)[0] for r, im in zip(recs, images)]
    keys = ("id", "box_text", "box", "crop", "answer")
    assert [{k: row[k] for k in keys} for row in batched] == [{k: row[k] for k in keys} for row in single]
    if mode == "gt_box":  # the crops really differ per record
        assert len({tuple(row["crop"]) for row in batched}) == len(recs)


def test_run_file_resumes_after_torn_line_and_retries_image_errors(loaded, toy, tmp_path):
    model, processor = loaded
    recs = mixed_records(toy, tmp_path)
    recs.append(dict(recs[0], id="late-image", image="late.png"))
    out = str(tmp_path / "preds.jsonl")
    written, skipped, errors = infer.run_file(model, processor, recs, str(tmp_path), out, {"model": "toy"}, [],
                                              batch_size=2, show_progress=False, max_new_tokens=6)
    assert (written, skipped, [e["id"] for e in errors]) == (5, 0, ["late-image"])
    assert "late.png" in common.read_jsonl(out + ".errors.jsonl")[0]["error"]
    full = open(out).read().splitlines()
    # A kill mid-write: two complete lines and half of the third.
    with open(out, "w") as f:
        f.write("\n".join(full[:2]) + "\n" + full[2][:25])
    Image.open(tmp_path / "0.png").save(tmp_path / "late.png")
    written, skipped, errors = infer.run_file(model, processor, recs, str(tmp_path), out, {"model": "toy"}, [],
                                              batch_size=2, show_progress=False, max_new_tokens=6)
    assert (written, skipped, errors) == (4, 2, [])
    rows = common.read_jsonl(out)
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in recs)
    untimed = [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")} for line in full[:3]]
    # greedy: the redone record comes out the same
    assert [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows[:3]] == untimed
    assert not os.path.exists(out + ".errors.jsonl")


def test_infer_cli(toy, tmp_path):
    data = str(toy / "data" / "train.jsonl")
    questions = [{k: v for k, v in r.items() if k != "answer"} for r in common.read_records(data)[:3]]
    common.write_jsonl(str(tmp_path / "three.jsonl"), questions)  # questions to answer: no answer field
    cmd = [sys.executable, os.path.join(ROOT, "infer.py"), "--model", str(toy / "qwen2-vl"), "--data",
           str(tmp_path / "three.jsonl"), "--image_root", str(toy / "data"), "--out", str(tmp_path / "p.jsonl"),
           "--max_new_tokens", "6"]
    assert "3 records answered" in run_script(*cmd).stdout
    row = common.read_jsonl(str(tmp_path / "p.jsonl"))[0]
    assert set(row) >= {"id", "question", "mode", "box_text", "box", "crop", "answer", "focus_s", "answer_s"}
    assert "0 records answered" in run_script(*cmd).stdout and "3 already done" in run_script(*cmd).stdout


def test_infer_single_image(loaded, toy, capsys, monkeypatch):
    image = str(toy / "data" / common.read_records(str(toy / "data" / "train.jsonl"))[0]["image"])
    infer.main(["--model", str(toy / "qwen2-vl"), "--image", image, "--question", "What shape is it?",
                "--max_new_tokens", "6"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["id"] == "cli" and row["mode"] == "chain" and isinstance(row["answer"], str)


def test_each_image_is_encoded_once_across_both_steps(loaded, toy, tmp_path):
    """Five records through the chain: one vision call on the 5 full images (serving both steps) and one on
    the 5 crops; not one per step and record."""
    model, processor = loaded
    recs = mixed_records(toy, tmp_path)
    images = [common.load_image(r, str(tmp_path)) for r in recs]
    calls = []
    hook = model.model.visual.register_forward_hook(
        lambda m, a, kw, out: calls.append((kw["grid_thw"] if "grid_thw" in kw else a[1]).shape[0]), with_kwargs=True)
    try:
        infer.run_batch(model, processor, recs, images, mode="chain", max_new_tokens=4)
    finally:
        hook.remove()
    assert calls == [5, 5]


def test_the_same_image_object_is_encoded_once(loaded, toy):
    """n samples of one request (the server's two-step model with n > 1) share one encode."""
    model, processor = loaded
    rec = common.read_records(str(toy / "data" / "train.jsonl"))[0]
    image = common.load_image(rec, str(toy / "data"))
    feats = common.image_features(model, processor, [image, image, image])
    assert feats[0] is feats[1] is feats[2]
