"""Multi-turn zoom (README "Zoom"): the call format and its mapping back to the original image, a conversation's
turn-by-turn encoding against the whole conversation rendered and encoded at once, SFT on zoom traces, and
GRPO's zoom rollouts (B prompts x G samples with different numbers of turns keep their own images, features,
log-probs and rewards; the script, killed mid-run, resumes exactly)."""
import json
import math
import random
import sys

import pytest
import torch
from conftest import FAMILIES, PY, run_script
from test_grpo import metric_rows

import common
import grpo


def conversation_messages(question, calls, answer):
    """The whole conversation as chat messages, for the chat template to render in one piece."""
    messages = common.zoom_messages(question)
    for call in calls:
        messages += [{"role": "assistant", "content": call}, {"role": "user", "content": [{"type": "image"}]}]
    return messages + [{"role": "assistant", "content": answer}]


def from_scratch(processor, messages, images):
    """A conversation encoded in one piece: the template's rendering, every image through the processor."""
    text = processor.apply_chat_template(messages, tokenize=False)
    return processor(text=[text], images=images, return_tensors="pt")


# ------------------------------------------------------------------------------------- the protocol

@pytest.mark.parametrize("box_format", common.BOX_FORMATS)
def test_a_call_maps_back_to_the_original_image(toy, box_format):
    """zoom_call_text writes a box relative to the view; zoom_box reads it back to original pixels by the
    view's offset: the same box up to the format's rounding (one pixel), never an offset error."""
    processor = common.load_processor(str(toy / "qwen2-vl"))
    for view, box in [([0, 0, 224, 168], [70, 70, 98, 98]), ([47, 46, 121, 122], [70, 65, 98, 93]),
                      ([100, 20, 200, 150], [150, 60, 190, 140])]:
        text = common.zoom_call_text(box, view, box_format, 3, processor)
        assert text.startswith("<zoom>") and text.endswith("</zoom>")
        got = common.zoom_box("I look closer: " + text + " then answer", view, box_format, processor)
        assert max(abs(a - b) for a, b in zip(got, box)) <= 1, (box_format, view, text, got, box)
    view = [0, 0, 224, 168]
    assert common.zoom_box("square", view, box_format, processor) is None  # no call: the answer
    assert common.zoom_box("<zoom>[0.5, 0.5]</zoom>", view, box_format, processor) == "invalid"
    for unclosed in ("<zoom>[0.1, 0.1, 0.2, 0.2]", "<zoom>[0.1, 0.1, 0.2, 0.2]</zooom>"):  # a broken call, no answer
        assert common.zoom_box(unclosed, view, box_format, processor) == "invalid"


@pytest.mark.parametrize("family", FAMILIES)
def test_turn_by_turn_encoding_equals_the_whole_conversation(toy, family):
    """A two-call trace encoded turn by turn (encode -> extend_turn) is token for token and pixel for pixel
    the conversation rendered by the chat template and encoded at once; the labels are exactly the model's
    turns (each call and the answer, EOS included) and estimate_tokens counts the length without pixels."""
    processor = common.load_processor(str(toy / family))
    rec = common.read_records(str(toy / "data" / "train.jsonl"))[0]
    views = [[20, 10, 150, 120], [40, 30, 100, 90]]
    calls = [common.zoom_call_text(views[0], [0, 0, 224, 168], "viscot", 2, processor),
             common.zoom_call_text(views[1], views[0], "viscot", 2, processor)]
    ex = common.Example(rec, str(toy / "data"), common.zoom_messages(rec["question"]), rec["answer"], calls=calls,
                        views=views)
    enc = common.encode(processor, ex)
    whole = from_scratch(processor, conversation_messages(rec["question"], calls, rec["answer"]), ex.images())
    n = len(enc["input_ids"])
    torch.testing.assert_close(enc["input_ids"], whole["input_ids"][0][:n], rtol=0, atol=0)
    assert processor.tokenizer.decode(whole["input_ids"][0][n:]).strip() == ""  # the template's closing newline
    torch.testing.assert_close(enc["pixel_values"], whole["pixel_values"], rtol=0, atol=0)
    torch.testing.assert_close(enc["image_grid_thw"], whole["image_grid_thw"], rtol=0, atol=0)
    eos = processor.tokenizer.eos_token
    labelled = enc["input_ids"][enc["labels"] != common.IGNORE_INDEX]
    assert processor.tokenizer.decode(labelled) == "".join(t + eos for t in calls + [rec["answer"]])
    assert common.estimate_tokens(processor, ex, 224, 168) == n


def test_zoom_traces_are_checked():
    rec = {"id": "a", "image": "x.png", "question": "q", "answer": "a", "width": 224, "height": 168}
    common.validate_record(dict(rec, zooms=[[10, 10, 100, 100], [20, 20, 50, 50]]), "f:1")
    common.validate_record(dict(rec, zooms=[]), "f:1")  # a trace that answers at once
    for zooms, says in [("[1, 2, 3, 4]", "a list of boxes"),
                        ([[10, 10, 100, 100], [5, 20, 50, 50]], "not inside zooms[0]"),
                        ([[10, 10, 300, 100]], "zooms[0]")]:
        with pytest.raises(common.DataError, match=r"f:1: record 'a'.*" + says.replace("[", r"\[")):
            common.validate_record(dict(rec, zooms=zooms), "f:1")


@pytest.mark.parametrize("box_format", ["viscot", "qwen2", "qwen25", "qwen3"])
def test_sft_trace_views_are_the_views_the_runtime_opens_for_their_calls(toy, monkeypatch, box_format):
    """Each view of an SFT zoom trace is the crop zoom_conversations opens when the model writes that call:
    crop_box of the box read back from the call's text (rounded), in the view before it, not of the trace's
    unrounded box (2000 random two-call traces differed by up to 2 px that way, and a second call written in
    the wrong view's frame read back invalid)."""
    import importlib
    monkeypatch.setattr(sys, "argv", ["sft.py", "--model", "m", "--data", "d", "--output_dir", "o"])
    sft = importlib.import_module("sft")
    monkeypatch.setattr(sft.args, "box_format", box_format)
    monkeypatch.setattr(sft.args, "box_decimals", 3)
    processor = common.load_processor(str(toy / "qwen2.5-vl"))
    min_crop, rng = common.token_pixels(processor), random.Random(0)
    for k in range(200):
        w, h = rng.randint(120, 600), rng.randint(120, 600)
        x1, y1 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
        outer = [x1, y1, rng.uniform(x1 + w / 4, w), rng.uniform(y1 + h / 4, h)]
        inner = [outer[0] + 3, outer[1] + 3, outer[0] + (outer[2] - outer[0]) / 2, outer[1] + (outer[3] - outer[1]) / 2]
        rec = {"id": str(k), "image": "x.png", "question": "q", "answer": "a", "zooms": [outer, inner]}
        ex = sft.zoom_example(rec, processor, w, h, min_crop)
        view = [0, 0, w, h]
        for call, shown in zip(ex.calls, ex.views):
            opened = common.zoom_box(call, view, box_format, processor)
            assert shown == common.crop_box(opened, w, h, min_crop)
            view = shown


# ------------------------------------------------------------------ a policy that zooms: SFT on traces

def write_traces(toy, path):
    """Zoom traces from the toy's annotated records: one call on the box, or a loose view first and then the
    box (two calls), alternately."""
    rows = []
    for i, rec in enumerate(common.read_records(str(toy / "data" / "train.jsonl"))):
        b, w, h = rec.pop("bbox"), rec["width"], rec["height"]
        loose = [max(0, b[0] - 30), max(0, b[1] - 30), min(w, b[2] + 30), min(h, b[3] + 30)]
        rows.append(dict(rec, zooms=[b] if i % 2 else [loose, b]))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def zoom_sft(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("zoom_sft")
    write_traces(toy, out / "traces.jsonl")
    run_script(PY, "sft.py", "--model", str(toy / "qwen2-vl"), "--data", str(out / "traces.jsonl"),
               "--image_root", str(toy / "data"), "--output_dir", str(out / "run"), "--finetune", "full",
               "--lr", "2e-3", "--warmup_ratio", "0.1", "--max_steps", "120", "--batch_size", "8",
               "--box_decimals", "2", "--log_steps", "10")
    return out


def test_sft_learns_zoom_traces(zoom_sft):
    rows = common.read_jsonl(str(zoom_sft / "run" / "metrics.jsonl"))
    assert all(set(r) >= {"loss_zoom"} and "loss_focus" not in r for r in rows)  # every example is a trace
    assert rows[-1]["loss_zoom"] < 0.25 * rows[0]["loss_zoom"]


def zoom_args(**kw):
    return grpo.parse_args(["--data", "x", "--model", "x", "--output_dir", "x", "--task", "zoom",
                            "--max_new_tokens", "48", "--max_turns", "3", "--rule_metric", "exact",
                            "--rewards", "answer,zoom_tool", *kw.get("extra", ())])


def test_zoom_rollouts_keep_their_own_turns_images_and_rewards(toy, zoom_sft):
    """B = 3 prompts x G = 4 sampled zoom rollouts of different lengths: each shows its own image and the
    crops of its own calls (features equal a fresh encode of each crop), its log-probs in the B x G batch
    equal its conversation rendered and encoded from scratch with all its images, the loss mask is exactly
    its own turns' tokens, and its reward is its own record's."""
    model_dir = str(zoom_sft / "run" / "final")
    processor, model = common.load_processor(model_dir), common.load_model(model_dir).eval()
    root = str(toy / "data")
    prompts = grpo.read_prompts(str(toy / "data" / "test.jsonl"), root, "zoom")[:3]
    images = grpo.load_images(prompts, root)
    args = zoom_args()
    torch.manual_seed(0)
    G = 4
    rollouts = grpo.rollout(model, processor, prompts, images, args, G, True)
    assert [r["prompt"] for r in rollouts] == [k // G for k in range(3 * G)]
    assert len({r["turns"] for r in rollouts}) > 1 and any(r["calls"] for r in rollouts)
    seqs = [r["seqs"][0] for r in rollouts]
    together, mask = grpo.sequence_logps(model, model, processor, seqs, 1.0, "cpu", reuse_features=True)
    tok = processor.tokenizer
    for k, (r, s) in enumerate(zip(rollouts, seqs)):
        full = images[r["prompt"]]
        assert s["images"][0] is full and len(s["images"]) == r["calls"] + 1 == len(r["views"]) + 1
        # Each call's view: its box (original pixels) grown to at least one vision token a side.
        assert r["views"] == [common.crop_box(b, full.width, full.height, common.token_pixels(processor))
                              for b in r["boxes"]]
        crops = [full.crop(tuple(v)) for v in r["views"]]
        assert [c.tobytes() for c in s["images"][1:]] == [c.tobytes() for c in crops]
        for got, want in zip(s["features"], common.image_features(model, processor, [full] + crops)):
            torch.testing.assert_close(got.embeds, want.embeds)
        # The model's turns: each call (up to EOS) and the last turn, re-read from the sequence's labels.
        turns = tok.decode(s["enc"]["input_ids"][s["enc"]["labels"] != common.IGNORE_INDEX]).split(tok.eos_token)
        calls = turns[:-1]
        assert len(calls) == r["calls"] and all(c.startswith("<zoom>") for c in calls)
        assert r["turns"] == r["calls"] + 1
        if r["invalid"]:
            continue  # an unparsable call or a vision token: its text is not a clean turn to re-render
        answer = tok.decode(s["ids"], skip_special_tokens=True)
        assert answer == r["text"]
        messages = conversation_messages(prompts[r["prompt"]]["text"], calls, answer)
        whole = from_scratch(processor, messages, [full] + crops)
        labels = torch.full_like(whole["input_ids"], common.IGNORE_INDEX)
        ids = whole["input_ids"][0]
        n = len(s["enc"]["input_ids"]) + len(s["ids"])
        torch.testing.assert_close(ids[:n], torch.cat([s["enc"]["input_ids"], torch.tensor(s["ids"])]), rtol=0, atol=0)
        labels[0, :n] = torch.cat([s["enc"]["labels"], torch.tensor(s["ids"])])
        batch = {"input_ids": whole["input_ids"][:, :n], "labels": labels[:, :n],
                 "attention_mask": torch.ones(1, n, dtype=torch.long),
                 "mm_token_type_ids": whole.get("mm_token_type_ids", torch.zeros_like(whole["input_ids"]))[:, :n],
                 "pixel_values": whole["pixel_values"], "image_grid_thw": whole["image_grid_thw"]}
        with torch.no_grad():
            alone, m1 = common.token_logprobs(model, batch)
        assert int(m1.sum()) == int(mask[k].sum()) == common.model_tokens(s)
        torch.testing.assert_close(together[k][mask[k]], alone[0][m1[0]], rtol=1e-4, atol=1e-4)
    # One crop, encoded once, per distinct view of a prompt's image, however many samples open it (greedy
    # samples of a prompt open the same views, so sharing is certain there).
    greedy = grpo.rollout(model, processor, prompts, images, args, 2, False)
    for batch in (rollouts, greedy):
        crops = {}
        for r in batch:
            for view, crop, f in zip(r["views"], r["seqs"][0]["images"][1:], r["seqs"][0]["features"][1:]):
                first = crops.setdefault((r["prompt"], tuple(view)), (crop, f))
                assert first[0] is crop and first[1] is f
    assert 0 < len(crops) < sum(r["calls"] for r in greedy)
    per_fn, total = grpo.score(rollouts, prompts, args)
    for k, r in enumerate(rollouts):
        right = float(common.exact_match(r["text"], prompts[r["prompt"]]["rec"]["answer"])) if r["answered"] else 0.0
        assert r["answered"] == (not r["invalid"] and not r["max_turns_hit"] and not r["context_hit"])
        assert per_fn["answer"][k] == right  # one that never answered scores 0 under every function, as in its total
        assert per_fn["zoom_tool"][k] == float(right == 1.0 and r["calls"] > 0)
        assert total[k] == right + per_fn["zoom_tool"][k]


def test_max_context_ends_a_conversation_at_the_call_that_would_outgrow_it(toy, zoom_sft):
    """--max_context: no conversation that opened a view is longer than the budget less one turn of
    max_new_tokens; a call refused for want of room is the conversation's last turn (context_hit), and what
    came before it is what the unlimited loop did (greedy). A budget below the first view refuses every call."""
    model_dir = str(zoom_sft / "run" / "final")
    processor, model = common.load_processor(model_dir), common.load_model(model_dir).eval()
    root = str(toy / "data")
    prompts = grpo.read_prompts(str(toy / "data" / "test.jsonl"), root, "zoom")[:12]
    images = grpo.load_images(prompts, root)

    def rollouts(*extra):
        return grpo.rollout(model, processor, prompts, images, zoom_args(extra=extra), 1, False)

    free = rollouts()
    lengths = sorted(len(r["seqs"][0]["enc"]["input_ids"]) for r in free if r["calls"])
    assert len(set(lengths)) > 1 and not any(r["context_hit"] for r in free), lengths
    budget = lengths[len(lengths) // 2] + 48  # the median conversation with a view just fits
    for max_context in (budget, 8):
        cut = rollouts("--max_context", str(max_context))
        assert any(r["context_hit"] for r in cut)
        for a, b, image in zip(cut, free, images):
            s = a["seqs"][0]
            if a["calls"]:
                assert len(s["enc"]["input_ids"]) + 48 <= max_context
            assert a["views"] == b["views"][:a["calls"]]  # the same looks, as far as they go
            if a["context_hit"]:  # its last turn is the call it was refused, the one the free loop made next
                assert a["turns"] == a["calls"] + 1 and b["calls"] > a["calls"]
                view = a["views"][-1] if a["views"] else [0, 0, image.width, image.height]
                assert common.zoom_box(a["text"], view, "viscot", processor) == b["boxes"][a["calls"]]
                assert s["stopped"] and len(s["images"]) == len(s["features"]) == a["calls"] + 1
            else:
                assert (a["text"], a["turns"]) == (b["text"], b["turns"])
        assert any(r["calls"] for r in cut) == (max_context == budget)
    metrics = grpo.zoom_metrics(dict(grpo.zoom_sums(cut, [0.0] * len(cut), None, 3), rollouts=len(cut)), 3)
    assert metrics["context_hit"] == sum(r["context_hit"] for r in cut) / len(cut) > 0


def test_a_conversation_that_never_answered_earns_nothing():
    """Stopped at a call (--max_turns, --max_context) or at an invalid one, a conversation's last turn is a
    call, not an answer: token F1 would credit a call whose box holds the answer's number (a qwen3 call with
    12 in it against '12' scores 0.33), so every reward function gives it 0, the tool bonus too."""
    prompts = [{"rec": {"id": "a", "answer": "12", "question": "q"}}]
    args = zoom_args(extra=["--rule_metric", "f1"])
    call = '<zoom>{"bbox_2d": [12, 34, 56, 78]}</zoom>'
    rollouts = [{"prompt": 0, "text": call, "calls": 2, "invalid": False, "answered": False},
                {"prompt": 0, "text": "12", "calls": 1, "invalid": False, "answered": True}]
    assert common.token_f1(call, "12") > 0
    per_fn, total = grpo.score(rollouts, prompts, args)
    assert per_fn == {"answer": [0.0, 1.0], "zoom_tool": [0.0, 1.0]} and total == [0.0, 2.0]


def test_a_turn_cut_by_max_new_tokens_is_an_answer_only_without_a_call(toy, monkeypatch):
    """A turn that --max_new_tokens cut ends the conversation: as its answer when it holds no call, else as an
    invalid call, closed or not, which every reward scores 0. Read as an answer, token F1 credited the numbers
    of the cut turn's box (0.29 against '0.1') and zoom_format called the broken call well-formed."""
    from PIL import Image
    processor = common.load_processor(str(toy / "qwen2-vl"))
    tok = processor.tokenizer
    cut_turns = ["<zoom>[0.1, 0.2, 0.3", "<zoom>[0.1, 0.1, 0.5, 0.5]</zoom> and then", "0.1 it is"]

    def cut_generation(model, processor, encoded, features=None, **gen):  # conversation k writes cut_turns[k]
        return [{"ids": tok(t, add_special_tokens=False)["input_ids"], "stopped": False} for t in cut_turns]
    monkeypatch.setattr(common, "generate_encoded", cut_generation)
    image, rec = Image.new("RGB", (224, 168)), {"id": "a", "question": "q", "answer": "0.1"}
    enc = common.encode(processor, common.Example(rec, None, common.zoom_messages("q")), [image], pixels=False)
    convs = common.zoom_conversations(None, processor, [enc] * 3, [image] * 3, [None] * 3, "viscot", 3,
                                      max_new_tokens=8)
    assert [(c["turns"], c["invalid"], c["answered"], c["views"]) for c in convs] == \
        [(1, True, False, []), (1, True, False, []), (1, False, True, [])]
    assert common.token_f1(convs[1]["text"], "0.1") > 0.28  # what the answer reward would have credited
    rollouts = [{"prompt": 0, "text": c["text"], "invalid": c["invalid"], "answered": c["answered"], "calls": 0}
                for c in convs]
    per_fn, _ = grpo.score(rollouts, [{"rec": rec}], zoom_args(extra=["--rewards", "answer,zoom_format",
                                                                      "--rule_metric", "f1"]))
    assert per_fn["answer"] == [0.0, 0.0, 0.5] and per_fn["zoom_format"] == [0.0, 0.0, 1.0]


def test_zoom_metrics_split_rewards_by_turns_taken():
    """Turn shares, and the total and the answer reward of the rollouts that took t turns, by hand: the tool
    bonus counts in the total only, so the answer's column says whether looking again paid."""
    took = [1, 2, 2, 3, 2]
    rollouts = [{"turns": t, "calls": t - 1, "max_turns_hit": t == 3, "context_hit": False} for t in took]
    answer, total = [1.0, 0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.5, 1.5, 1.5]
    sums = grpo.zoom_sums(rollouts, total, answer, 4)
    m = grpo.zoom_metrics({**sums, "rollouts": 5.0}, 4)
    assert m["turns"] == pytest.approx(2.0) and m["zoom_calls"] == pytest.approx(1.0)
    assert m["max_turns_hit"] == pytest.approx(0.2)
    assert [m[f"share_turns_{t}"] for t in (1, 2, 3, 4)] == pytest.approx([0.2, 0.6, 0.2, 0.0])
    assert [m[f"answer_reward_turns_{t}"] for t in (1, 2, 3)] == pytest.approx([1.0, 2 / 3, 1.0])
    assert [m[f"reward_turns_{t}"] for t in (1, 2, 3)] == pytest.approx([1.0, 1.0, 1.5])
    assert "reward_turns_4" not in m and "answer_reward_turns_4" not in m
    m = grpo.zoom_metrics({**grpo.zoom_sums(rollouts, total, None, 4), "rollouts": 5.0}, 4)
    assert "answer_reward_turns_2" not in m and m["reward_turns_2"] == pytest.approx(1.0)


def test_grpo_zoom_script_logs_turns_and_resumes_exactly_after_a_kill(run, toy, zoom_sft, tmp_path):
    """grpo.py --task zoom run as a user runs it: the turn metrics are logged, and a run killed (SIGKILL) after
    its step-2 checkpoint, in step 3, then rerun with --resume latest writes the same metrics and samples as one
    straight run (the killed run's step-3 lines dropped, steps 3 and 4 redone)."""
    def command(out, *extra):
        return ("grpo.py", "--model", zoom_sft / "run" / "final", "--data", toy / "data" / "train.jsonl",
                "--output_dir", out, "--task", "zoom", "--rewards", "answer,zoom_tool", "--rule_metric", "exact",
                "--num_generations", "4", "--batch_size", "2", "--max_new_tokens", "48", "--max_turns", "3",
                "--lr", "1e-3", "--beta", "0.1", "--max_steps", "4", "--save_steps", "2", "--seed", "3",
                "--log_steps", "1", "--sample_steps", "1", *extra)

    straight = run(*command(tmp_path / "straight"))
    assert straight.rc == 0, straight.stderr[-3000:]
    rows = metric_rows(tmp_path / "straight")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert 1 <= r["turns"] <= 3 and r["zoom_calls"] == pytest.approx(r["turns"] - 1)
        assert sum(r[f"share_turns_{t}"] for t in (1, 2, 3)) == pytest.approx(1.0)
        for t in (1, 2, 3):  # a turn count some rollout took has its answer reward, one none took has no entry
            assert (f"answer_reward_turns_{t}" in r) == (r[f"share_turns_{t}"] > 0)
            assert 0.0 <= r.get(f"answer_reward_turns_{t}", 0.0) <= r.get(f"reward_turns_{t}", 0.0) + 1e-9
        assert 0.0 <= r["invalid"] <= 1.0
        assert all(math.isfinite(r[key]) for key in ("loss", "kl", "entropy", "grad_norm"))
    assert any(r["zoom_calls"] > 0 for r in rows) and rows[-1]["kl"] > 0
    samples = common.read_jsonl(str(tmp_path / "straight" / "samples.jsonl"))
    assert all("views" in c for c in samples[0]["completions"])

    cut = tmp_path / "cut"
    assert run(*command(cut), kill_when=(cut / "metrics.jsonl", 3)).rc == -9
    assert not (cut / "final").exists() and (cut / "checkpoint-2").exists()
    resumed = run(*command(cut, "--resume", "latest"))
    assert resumed.rc == 0, resumed.stderr[-3000:]
    assert "resuming at step 2" in resumed.stdout, resumed.stdout
    got = metric_rows(cut)
    assert [r["step"] for r in got] == [r["step"] for r in rows]
    for a, b in zip(got, rows):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    assert common.read_jsonl(str(cut / "samples.jsonl")) == samples


def test_eval_zoom_reports_turns(toy, zoom_sft, tmp_path):
    """eval.py --protocol zoom --model runs infer.py's zoom loop and reports the answer score with the turn
    statistics; per-question rows carry each question's turns."""
    out = tmp_path / "zoom.json"
    run_script(PY, "eval.py", "--protocol", "zoom", "--questions", str(toy / "data" / "test.jsonl"), "--model",
               str(zoom_sft / "run" / "final"), "--out", str(out), "--max_new_tokens", "48", "--rule_metric", "exact")
    report = json.loads(out.read_text())
    items = common.read_jsonl(str(tmp_path / "zoom.items.jsonl"))
    assert report["n"] == len(items) == 16
    assert report["turns"] == pytest.approx(sum(i["turns"] for i in items) / 16)
    assert report["zoom_calls"] == pytest.approx(sum(i["zoom_calls"] for i in items) / 16)
    assert report["zoom_calls"] > 0 and sum(report[f"n_turns_{t}"] for t in (1, 2, 3) if f"n_turns_{t}" in report) == 16
    assert report["answer_score"] == pytest.approx(sum(i["answer_score"] for i in items) / 16)
