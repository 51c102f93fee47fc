"""Model loading, label masking, batch invariance, log-probs against a float64 gather and generation with
precomputed vision features, on the tiny model of every family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5)."""
import copy
import os
import re

import pytest
import torch
from conftest import FAMILIES
from PIL import Image

import common
from common import IGNORE_INDEX, Example


@pytest.fixture(scope="module")
def loaded(toy):
    out = {}
    for family in FAMILIES:
        path = str(toy / family)
        out[family] = (common.load_model(path, attn="eager").eval(), common.load_processor(path))
    return out


def records(toy):
    return common.read_records(str(toy / "data" / "train.jsonl"))


def examples(toy, prompt_set="visrl"):
    """Three mixed examples: two-image answer step, one-image focus step, another two-image step."""
    root = str(toy / "data")
    r = records(toy)
    return [
        Example(r[0], root, common.answer_messages(r[0]["question"], prompt_set), r[0]["answer"],
                crop=common.crop_box(r[0]["bbox"], 224, 168, 28)),
        Example(r[1], root, common.focus_messages(r[1]["question"], prompt_set),
                common.box_to_text(r[1]["bbox"], "viscot", 224, 168, 2)),
        Example(r[2], root, common.answer_messages(r[2]["question"], prompt_set), "a much longer answer than usual",
                crop=common.crop_box([0, 0, 100, 90], 224, 168, 28)),
    ]


def test_processor_and_model_families(loaded):
    """Each toy model is its family, and the family table says what its processor and features are."""
    for family, (model, processor) in loaded.items():
        entry = common.family_of(model)
        assert model.config.model_type == family.replace("-", "_").replace(".", "_")
        assert type(processor).__name__ == entry.processor
        assert processor.tokenizer.eos_token == "<|im_end|>"
        # One merged vision token (the smallest crop): 14 x 2 pixels in Qwen2/2.5-VL, 16 x 2 in Qwen3-VL/3.5.
        assert common.token_pixels(processor) == (32 if family in ("qwen3-vl", "qwen3.5") else 28)
        features = common.image_features(model, processor, [Image.new("RGB", (224, 168), (200, 120, 40))])[0]
        assert bool(features.deepstack) == entry.deepstack
        layer_types = getattr(model.config.text_config, "layer_types", None) or []
        assert ("linear_attention" in layer_types) == entry.recurrent
        # The table's vision tokens are the family's tokenizer's special tokens, one id each, the image one among them.
        tok = processor.tokenizer
        ids = tok.convert_tokens_to_ids(list(entry.vision_tokens))
        assert tok.unk_token_id not in ids and len(set(ids)) == len(ids)
        assert all(tok(t, add_special_tokens=False)["input_ids"] == [i] for t, i in zip(entry.vision_tokens, ids))
        assert processor.image_token in entry.vision_tokens and set(entry.vision_tokens) <= set(common.VISION_TOKENS)
        # Qwen3-VL and Qwen3.5 interleave M-RoPE's sections (transformers' mrope_interleaved); Qwen2/2.5-VL do not.
        rope = model.config.text_config.rope_parameters or {}
        assert bool(rope.get("mrope_interleaved")) == (family in ("qwen3-vl", "qwen3.5")), rope


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_cover_assistant_tokens_only(loaded, toy, family):
    _, processor = loaded[family]
    tok = processor.tokenizer
    for ex in examples(toy):
        enc = common.encode(processor, ex)
        ids, labels = enc["input_ids"].tolist(), enc["labels"].tolist()
        first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
        # Token by token: everything before the response is masked, everything after it is the response.
        assert all(lab == IGNORE_INDEX for lab in labels[:first])
        assert labels[first:] == ids[first:]
        assert tok.decode(ids[first:]) == ex.response + "<|im_end|>"
        assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")
        n_images = tok.decode(ids[:first]).count("<|vision_start|>")
        assert n_images == (2 if ex.crop else 1)
        image_tokens = sum(1 for i in ids if i == tok.convert_tokens_to_ids("<|image_pad|>"))
        assert image_tokens == int(enc["image_grid_thw"].prod(-1).sum()) // 4
        assert enc["mm_token_type_ids"].sum() == image_tokens


def test_prompt_sets_are_selectable(loaded, toy):
    _, processor = loaded["qwen2-vl"]
    text = processor.tokenizer.decode(common.encode(processor, examples(toy, "viscot")[0])["input_ids"])
    assert "Please answer the question based on the original image and local detail image. What shape" in text
    text = processor.tokenizer.decode(common.encode(processor, examples(toy, "visrl")[0])["input_ids"])
    assert "then refer to the corresponding sub-image to answer the question better." in text
    assert text.index("then refer") < text.rindex("<|vision_start|>")  # the crop comes after the text


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_invariance(loaded, toy, family, side):
    model, processor = loaded[family]
    exs = examples(toy)
    encoded = [common.encode(processor, ex) for ex in exs]
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        batched, _ = common.token_logprobs(model, common.collate(encoded, pad, side))
        alone = [common.token_logprobs(model, common.collate([e], pad, side))[0].sum().item() for e in encoded]
    assert batched.sum(-1).tolist() == pytest.approx(alone, rel=1e-5, abs=1e-4)
    n_labels = [int((e["labels"] != IGNORE_INDEX).sum()) for e in encoded]
    assert [int(x) for x in (batched != 0).sum(-1)] == n_labels


@pytest.mark.parametrize("family", FAMILIES)
def test_token_logprobs_equals_full_logits_gather(loaded, toy, family):
    """The labelled-positions-only projection gives what a full-vocabulary gather over all logits does."""
    model, processor = loaded[family]
    batch = common.collate([common.encode(processor, ex) for ex in examples(toy)], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        got, mask = common.token_logprobs(model, batch)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["labels"][:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref = ref * mask
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_estimated_length_matches_encoding(loaded, toy, family):
    _, processor = loaded[family]
    for ex in examples(toy):
        assert common.estimate_tokens(processor, ex, 224, 168) == len(common.encode(processor, ex)["input_ids"])


@pytest.mark.parametrize("family", FAMILIES)
def test_encoding_without_pixels_lays_out_the_same_tokens(loaded, toy, family):
    """encode(pixels=False), for sequences whose vision features come from elsewhere, reads the images' sizes
    only: the same ids, labels, token types and image grids as the processor with pixels, for one- and
    two-image prompts and a zoom trace whose views have odd sizes."""
    _, processor = loaded[family]
    r = records(toy)[3]
    zoom = Example(r, str(toy / "data"), common.zoom_messages(r["question"]), r["answer"],
                   calls=["[1, 2, 3, 4]", "[5, 6, 7, 8]"], views=[[3, 5, 120, 77], [10, 10, 47, 39]])
    for ex in examples(toy) + [zoom]:
        with_pixels, without = common.encode(processor, ex), common.encode(processor, ex, pixels=False)
        assert without["pixel_values"] is None and with_pixels["pixel_values"] is not None
        for key in ("input_ids", "labels", "mm_token_type_ids", "image_grid_thw"):
            assert torch.equal(with_pixels[key], without[key]), key


def test_lora_targets_language_model_only(toy):
    import argparse
    args = argparse.Namespace(finetune="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                              lora_targets=common.LM_ONLY_TARGETS, train_vision=False, gradient_checkpointing=False)
    model = common.prepare_for_training(common.load_model(str(toy / "qwen2-vl")), args)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    full = common.prepare_for_training(common.load_model(str(toy / "qwen2-vl")),
                                       argparse.Namespace(**dict(vars(args), finetune="full")))
    frozen = [n for n, p in full.named_parameters() if not p.requires_grad]
    assert frozen and all(common.is_vision_param(n) for n in frozen)
    assert all(p.requires_grad for n, p in full.named_parameters() if not common.is_vision_param(n))
    # --lora_targets is checked on a weightless build before a stage starts: the default pattern passes (and
    # selects what get_peft_model wrapped above), one that names no module is refused.
    args = argparse.Namespace(**dict(vars(args), model=str(toy / "qwen2-vl"), adapter=None))
    common.check_lora_targets(args)
    with pytest.raises(common.DataError, match=r"--lora_targets '\.\*vision\.\*q_proj' matches no module"):
        common.check_lora_targets(argparse.Namespace(**dict(vars(args), lora_targets=".*vision.*q_proj")))


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_batched_equals_one_by_one(loaded, toy, family):
    """Left-padded batched generation equals each prompt alone: padding leaks into nothing (for Qwen3.5, not
    into the linear-attention layers' recurrent and convolution state either)."""
    model, processor = loaded[family]
    root, recs = str(toy / "data"), records(toy)[:3]
    # prompts of four lengths (every toy question tokenizes alike: longer wording, and a second image), so the
    # batch left-pads every prompt but the longest
    exs = [Example(r, root, common.focus_messages(r["question"] + " Look closely." * k)) for k, r in enumerate(recs)]
    exs.append(Example(recs[0], root, common.answer_messages(recs[0]["question"]),
                       crop=common.crop_box(recs[0]["bbox"], 224, 168, common.token_pixels(processor))))
    assert len({len(common.encode(processor, ex, ex.images())["input_ids"]) for ex in exs}) == 4
    batched = common.generate(model, processor, exs, max_new_tokens=8)
    single = [common.generate(model, processor, [ex], max_new_tokens=8)[0] for ex in exs]
    assert batched == single


def test_a_checkpoints_generation_config_does_not_shape_our_sampling(loaded, toy):
    """Released Qwen2-VL/Qwen2.5-VL checkpoints ship top_k 1, top_p 0.001 and repetition_penalty 1.05 in
    generation_config.json: greedy decoding stays the argmax and sampling stays the policy at its temperature
    whatever the checkpoint's generation_config says."""
    model, processor = loaded["qwen2-vl"]
    exs = [Example(r, str(toy / "data"), common.focus_messages(r["question"])) for r in records(toy)[:3]]

    def both():
        torch.manual_seed(0)
        sampled = common.generate(model, processor, exs, max_new_tokens=12, do_sample=True, temperature=1.0)
        return common.generate(model, processor, exs, max_new_tokens=12), sampled

    clean = both()
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    model.generation_config.update(top_k=1, top_p=0.001, repetition_penalty=5.0, no_repeat_ngram_size=1)
    try:
        assert both() == clean
    finally:
        model.generation_config = saved


@pytest.mark.parametrize("family", FAMILIES)
def test_precomputed_image_features_generate_the_same(loaded, toy, family):
    """Vision features computed once and shared by several sequences (both images of 2-image examples, the
    same image for repeated prompts) give what running the vision tower per sequence gives."""
    model, processor = loaded[family]
    exs = examples(toy)
    images = [ex.images() for ex in exs] * 2  # each example twice: shared features, repeated prompts
    unique = [im for per_example in images[:3] for im in per_example]
    feats = common.image_features(model, processor, unique)
    per_example, k = [], 0
    for ex_images in images[:3]:
        per_example.append(feats[k:k + len(ex_images)])
        k += len(ex_images)
    exs = [common.Example(ex.rec, ex.image_root, ex.messages, crop=ex.crop) for ex in exs] * 2
    with_pixels = common.generate(model, processor, exs, max_new_tokens=8, images=images)
    with_features = common.generate(model, processor, exs, max_new_tokens=8, images=images,
                                    features=per_example * 2)
    assert with_features == with_pixels and with_pixels[:3] == with_pixels[3:]


def rollout_batch(toy, processor, features_of):
    """GRPO's focus sequences and a DPO pair as the stages build them, without pixels: for each of two prompts,
    three box completions of its one encoded prompt and three answers on different crops of its image, then a
    chosen and a rejected answer on one crop; and the features of each row's images, each image encoded once."""
    root = str(toy / "data")
    rows, features = [], []
    for i, rec in enumerate(records(toy)[:2]):
        image = common.load_image(rec, root)
        full = features_of([image])[0]
        enc = common.encode(processor, Example(rec, None, common.focus_messages(rec["question"])), [image],
                            pixels=False)
        for k, box in enumerate([[0, 0, 100, 90], [40, 30, 200, 160], [10, 60, 90, 150]]):
            rows.append(common.extend_turn(None, enc, common.response_ids(
                processor, common.box_to_text(box, "viscot", 224, 168, 2) + " " * k)))
            features.append([full])
            crop = common.crop_box(box, 224, 168, 28)
            crop_image = image.crop(tuple(crop))
            ex = Example(rec, None, common.answer_messages(rec["question"]), crop=crop)
            answer = common.encode(processor, ex, [image, crop_image], pixels=False)
            rows.append(common.extend_turn(None, answer, common.response_ids(processor, ["red", "a square"][i])))
            features.append([full, features_of([crop_image])[0]])
    crop_features = features[-1][1]
    for response in ("blue", "a much longer answer"):
        rows.append(common.extend_turn(None, answer, common.response_ids(processor, response)))
        features.append([full, crop_features])
    return common.collate(rows, processor.tokenizer.pad_token_id), [f for per_row in features for f in per_row]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefixes_give_the_single_forwards_logprobs_and_gradients(toy, family, attn, monkeypatch):
    """Sequences that open with the same prompt and image run it once (common.prefix_groups): the log-probs
    and every parameter's gradient equal the single forward's in float64; the box completions of a prompt
    share its whole prompt, its answers the part before their crops, the DPO pair everything but the answer.
    Qwen3.5 (linear-attention layers) and gradient checkpointing keep the single forward."""
    path = str(toy / family)
    model, processor = common.load_model(path, dtype=torch.float64, attn=attn), common.load_processor(path)
    batch, features = rollout_batch(toy, processor, lambda ims: common.vision_features(model, processor, ims))
    groups = common.prefix_groups(model, batch, features)
    if family == "qwen3.5":
        assert groups is None
        return
    cuts, group_of, owners = groups
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert common.prefix_groups(model, batch, features) is None  # a checkpointed layer drops the cache
    model.gradient_checkpointing_disable()
    left = dict(batch, attention_mask=batch["attention_mask"].clone())
    left["attention_mask"][0, 0] = 0  # a row that opens with padding
    assert common.prefix_groups(model, left, features) is None  # prefixes start at position 0: right padding only
    # 2 prompts x (box, answer) x 3, then the pair, which shares its crop with the last answer before it
    assert group_of == [0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 4, 4, 4] and owners == [0, 1, 6, 7, 11]
    before_answer = [int((batch["labels"][r] != IGNORE_INDEX).nonzero()[0]) - 1 for r in range(len(cuts))]
    crop_start = int((batch["mm_token_type_ids"][1] == 1).nonzero()[-1]) + 1 - int(features[2].embeds.shape[0])
    assert cuts[0] == before_answer[0] and cuts[11] == before_answer[11]  # the whole prompt
    assert cuts[1] == crop_start  # the answers of one prompt: up to their crops

    def logps_and_grads():  # the vision tower's gradients too: its features are computed anew each time
        model.zero_grad()
        batch, features = rollout_batch(toy, processor, lambda ims: common.vision_features(model, processor, ims))
        logp, mask = common.token_logprobs(model, batch, temperature=0.7, features=features)
        (logp * torch.linspace(-1, 2, logp.shape[0], dtype=logp.dtype)[:, None]).sum().backward()
        return logp.detach(), mask, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    shared = logps_and_grads()
    monkeypatch.setattr(common, "prefix_groups", lambda *args: None)
    single = logps_and_grads()
    # transformers' eager attention takes its softmax in float32 even for a float64 model, and the shared
    # prefix's gradient sums its rows before that softmax's backward, the single forward after: the two are
    # float32 rounding apart
    torch.testing.assert_close(shared[0], single[0], rtol=1e-6, atol=1e-5)
    assert torch.equal(shared[1], single[1]) and shared[2].keys() == single[2].keys()
    for name, grad in single[2].items():
        torch.testing.assert_close(shared[2][name], grad, rtol=0, atol=1e-6 * float(grad.abs().max()), msg=name)


def test_two_image_processor_files_exist(toy):
    assert os.path.exists(toy / "qwen2-vl" / "preprocessor_config.json")


def test_vision_tokens_in_a_response_are_refused(toy):
    rec = records(toy)[0]
    with pytest.raises(common.DataError, match="record 'train-0': response holds the special token"):
        Example(rec, str(toy / "data"), common.focus_messages(rec["question"]), "look <|image_pad|> here")
    with pytest.raises(common.DataError, match=r"response holds the special token <\|im_end\|>"):
        Example(rec, str(toy / "data"), common.focus_messages(rec["question"]), "circle<|im_end|>")
    # A question or answer of a record is refused when the data are read, before any stage starts.
    for key, token in (("question", "<|vision_start|>"), ("answer", "<|im_start|>")):
        with pytest.raises(common.DataError, match=rf"^f:1: record 'train-0': {key} holds the special token "
                                                   + re.escape(token)):
            common.validate_record(dict(rec, **{key: f"what {token} is"}), "f:1")
