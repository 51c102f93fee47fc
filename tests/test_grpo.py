"""grpo.py: the reward functions against SPEC 4.6 case by case, advantages, the loss against a float64
re-implementation for every aggregation, the one-update gradient against REINFORCE with a group baseline,
rollout alignment with B > 1 prompts x G > 1 samples (the pixel_values repeat trap), batch invariance of the
log-probs, and the script end to end (resume, launchers, bad input). Learning is in test_learning.py."""
import json
import math
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, run_script

import common
import grpo

GT2 = ("<answer>[{'Position': [0, 0, 100, 100], 'Confidence': 1}, "
       "{'Position': [200, 200, 300, 300], 'Confidence': 1}]</answer>")
GT1 = "<answer>[{'Position': [0, 0, 100, 100], 'Confidence': 1}]</answer>"


def det(*items):
    return "<think>x</think> <answer>[" + ", ".join(f"{{'Position': {list(b)}, 'Confidence': {c}}}" for b, c in items) \
        + "]</answer>"


# ----------------------------------------------------------------------------------------------- rewards

@pytest.mark.parametrize("text,want", [
    ("<think>look</think> <answer>cat</answer>", 1.0),
    ("<think>look</think><answer>cat</answer>", 1.0),
    ("<think>line one\nline two</think>\n<answer>a\nb</answer>", 1.0),  # the dot matches newlines
    ("<answer>cat</answer>", 0.0),
    ("<think>look</think> <answer>cat</answer> and more", 0.0),  # the whole output must match
    ("prefix <think>look</think> <answer>cat</answer>", 0.0),
    ("<think>look</think> <answer>cat", 0.0),
    ("", 0.0),
])
def test_format_reward(text, want):
    assert grpo.REWARDS["format"]([text]) == [want]


@pytest.mark.parametrize("text,sol,iou,conf", [
    # both found: IoU 1 each; confidence of matched predictions
    (det(([0, 0, 100, 100], 0.9), ([200, 200, 300, 300], 0.8)), GT2, 1.0, 0.85),
    # a duplicate position counts once (the first, 0.9): one of two found
    (det(([0, 0, 100, 100], 0.9), ([0, 0, 100, 100], 0.7)), GT2, 0.5, 0.9),
    # more predictions than ground truth: / max(#gt, #pred); the miss scores 1 - c
    (det(([0, 0, 100, 100], 0.9), ([200, 200, 300, 300], 0.8), ([500, 500, 600, 600], 0.3)), GT2, 2 / 3,
     (0.9 + 0.8 + 0.7) / 3),
    # confidence order decides the match: the 0.9 box (IoU 0.8) takes the one gt box before the exact 0.3 one
    (det(([0, 0, 100, 100], 0.3), ([0, 0, 100, 80], 0.9)), GT1, 0.8 / 2, (0.9 + 0.7) / 2),
    # IoU 0.5 exactly is not a match
    (det(([0, 0, 100, 50], 0.6),), GT1, 0.0, 0.4),
    # [[ ]] and a list cut off mid-item are repaired
    ("<answer>[[{'Position': [0, 0, 100, 100], 'Confidence': 1}]]</answer>", GT1, 1.0, 1.0),
    ("<answer>[{'Position': [0, 0, 100, 100], 'Confidence': 0.5}, {'Position': [20", GT1, 0.0, 0.0),  # unclosed tag
    ("[{'Position': [0, 0, 100, 100], 'Confidence': 0.5}, {'Position': [20", GT1, 1.0, 0.5),  # no tag: whole text
    ('<answer>[{"Position": [0, 0, 100, 100], "Confidence": 1}]</answer>', GT1, 1.0, 1.0),  # double quotes
    ("<answer></answer>", GT1, 0.0, 0.0),  # empty answer
    ("<answer>a cat</answer>", GT1, 0.0, 0.0),  # unparsable
    ("<answer>[{'Position': [0, 0, 100], 'Confidence': 1}]</answer>", GT1, 0.0, 0.0),  # not a box
    ("<answer>[{'Position': [0, 0, 100, 100], 'Confidence': true}]</answer>", GT1, 0.0, 0.0),  # not a number
    (det(([100, 0, 200, 100], 0.6),), GT1, 0.0, 0.4),  # touching edges: no overlap
    (det(([50, 50, 50, 80], 0.6),), GT1, 0.0, 0.4),  # zero area never matches
    (det(([0, 0, 100, 100], 1.7),), GT1, 1.0, 1.0),  # confidence clipped to [0, 1]
    ("<answer>No Objects</answer>", "<answer>No Objects</answer>", 1.0, 1.0),  # nothing to find, nothing found
    ("<answer>[]</answer>", GT1, 0.0, 0.0),  # nothing found, something to find
    (det(([0, 0, 100, 100], 0.2),), "<answer>No Objects</answer>", 0.0, 0.8),
])
def test_strict_detection_rewards(text, sol, iou, conf):
    """det_*_strict; the published det_iou / det_confidence are tested in test_virft_rules.py."""
    assert grpo.REWARDS["det_iou_strict"]([text], solution=[sol]) == [pytest.approx(iou)]
    assert grpo.REWARDS["det_confidence_strict"]([text], solution=[sol]) == [pytest.approx(conf)]


@pytest.mark.parametrize("text,label,want", [
    ("<think>x</think><answer>Golden Retriever</answer>", "<answer>golden_retriever</answer>", 1.0),
    ("golden retriever", "golden_retriever", 1.0),
    ("<answer>retriever</answer>", "golden_retriever", 0.0),  # no substring credit
    ("<answer>Golden Retriever dog</answer>", "golden_retriever", 0.0),
    ("<answer></answer>", "golden_retriever", 0.0),  # an empty answer is a substring of everything: 0
    ("<answer></answer>", "<answer></answer>", 0.0),
])
def test_cls_reward(text, label, want):
    assert grpo.REWARDS["cls"]([text], solution=[label]) == [want]


def test_grounding_rewards():
    w, h, box = 168, 112, [10.0, 20.0, 60.0, 80.0]
    exact = common.box_to_text(box, "viscot", w, h)
    beside = common.box_to_text([60.0, 20.0, 110.0, 80.0], "viscot", w, h)  # same size, touching on the right
    texts = [exact, f"<answer>{exact}</answer>", beside, "no box", "[0.5, 0.5, 0.5, 0.6]"]
    fields = {"width": [w] * 5, "height": [h] * 5, "bbox": [box] * 5}
    giou = grpo.REWARDS["grounding_giou"](texts, **fields)
    iou = grpo.REWARDS["grounding_iou"](texts, **fields)
    assert giou[:2] == [pytest.approx(2.0, abs=0.02)] * 2 and iou[:2] == [pytest.approx(1.0, abs=0.01)] * 2
    assert iou[2] == pytest.approx(0.0, abs=0.01) and 0.9 < giou[2] < 1.0  # GIoU of touching equal boxes is 0 (+1)
    assert giou[3:] == [0.0, 0.0] and iou[3:] == [0.0, 0.0]  # unparsable; zero-area
    # The ground truth from a Visual-RFT-style solution in the same box format instead of a pixel bbox.
    sol = grpo.REWARDS["grounding_iou"](texts[:1], width=[w], height=[h], solution=[f"<answer>{exact}</answer>"])
    assert sol == [pytest.approx(1.0, abs=1e-6)]
    # qwen25 boxes are pixels of the processor's resized image (here 336 x 224 for a 168 x 112 image).
    q25 = grpo.REWARDS["grounding_iou"](['{"bbox_2d": [0, 0, 168, 112]}'], width=[168], height=[112],
                                        bbox=[[0, 0, 84, 56]], resized_hw=[(224, 336)], box_format="qwen25")
    assert q25 == [pytest.approx(1.0)]


def test_answer_reward():
    # The last record is Visual-RFT style (solution, no answer): both formats can share a batch.
    out = grpo.REWARDS["answer"](["<answer>The circle.</answer>", "a circle", "square", "", "circle"],
                                 answer=["circle", "circle", "circle", "circle", None],
                                 solution=[None, None, None, None, "<answer>circle</answer>"], rule_metric="exact")
    assert out == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert grpo.REWARDS["cls"](["cat", "dog"], answer=["cat", None], solution=[None, "<answer>dog</answer>"]) == \
        [1.0, 1.0]
    f1 = grpo.REWARDS["answer"](["red circle"], solution=["<answer>circle</answer>"], rule_metric="f1")
    assert f1 == [pytest.approx(2 / 3)]


def test_rewards_are_aligned_and_typed():
    # Each reward returns one float per completion, in order, for a batch with mixed records.
    sols = [GT1, GT2, "<answer>No Objects</answer>"]
    texts = [det(([0, 0, 100, 100], 1),), det(([0, 0, 100, 100], 1),), "No Objects"]
    assert grpo.REWARDS["det_iou_strict"](texts, solution=sols) == [1.0, 0.5, 1.0]
    assert grpo.REWARDS["det_iou"](texts, solution=sols) == [1.0, 0.5, 0.0]  # published: 'No Objects' scores 0
    for name, fn in grpo.REWARDS.items():
        out = fn(["x"] * 3, solution=["<answer>x</answer>"] * 3, answer=["x"] * 3, bbox=[[0, 0, 5, 5]] * 3,
                 width=[10] * 3, height=[10] * 3, calls=[0, 1, 2])
        assert len(out) == 3 and all(isinstance(v, float) for v in out), name


# -------------------------------------------------------------------------------------------- advantages

def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.3, 0.3 + 1e-9, 0.3, 0.3], [2.0, 0.0, 1.0, 1.0]],
                     dtype=torch.float64)
    adv, flat = grpo.group_advantages(r, "group")
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # centred 0.5 over the unbiased std of (1, 0, 0, 1), + 1e-4
    assert adv[0].tolist() == pytest.approx([a, -a, -a, a])
    assert adv[1].tolist() == [0.0] * 4 and adv[2].tolist() == [0.0] * 4  # zero variance, within tolerance too
    assert flat.tolist() == [False, True, True, False]
    adv, _ = grpo.group_advantages(r, "none")
    assert adv[3].tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0])
    adv, _ = grpo.group_advantages(r, "batch", batch_std=2.0)
    assert adv[3].tolist() == pytest.approx([1 / 2.0001, -1 / 2.0001, 0.0, 0.0])


# -------------------------------------------------------------------------------------------------- loss

def float64_step_loss(micro, aggregation, beta, eps_lo, eps_hi, max_tokens):
    """The step loss from SPEC 4.6 with Python floats, rollout by rollout: a rollout is one or more
    sequences (focus: two), each a list of (logp, old, ref) per token of the loss."""
    rollouts = [r for mb in micro for r in mb]
    n_tokens = sum(len(seq) for r in rollouts for seq in r["seqs"])

    def token_loss(lp, old, ref, a):
        ratio = math.exp(lp - old)
        clipped = min(max(ratio, 1 - eps_lo), 1 + eps_hi)
        x = -min(ratio * a, clipped * a)
        if beta:
            d = max(-20.0, min(20.0, ref - lp))
            x += beta * (math.exp(d) - d - 1)
        return x

    total = 0.0
    for r in rollouts:
        losses = [token_loss(*t, r["adv"]) for seq in r["seqs"] for t in seq]
        if aggregation == "seq-mean-token-mean":
            total += (sum(losses) / len(losses) if losses else 0.0) / len(rollouts)
        elif aggregation == "token-mean":
            total += sum(losses) / n_tokens
        else:
            total += sum(losses) / (len(rollouts) * max_tokens)
    return total


def random_micro(seed, n_rollouts, seqs_per_rollout, T=9):
    """Rollouts with random log-probs and lengths (some sequences fully masked, as a truncated one under
    --mask_truncated) and advantages with one zero-variance group."""
    g = torch.Generator().manual_seed(seed)
    S = n_rollouts * seqs_per_rollout
    logp = -torch.rand(S, T, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(S, T, generator=g, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(S, T, generator=g, dtype=torch.float64) * 0.5
    lengths = torch.randint(0, T + 1, (S,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(n_rollouts, generator=g, dtype=torch.float64)
    adv[:2] = 0.0
    seq_rollout = torch.arange(n_rollouts).repeat_interleave(seqs_per_rollout)
    rollouts = [{"adv": float(adv[k]), "seqs": []} for k in range(n_rollouts)]
    for s in range(S):
        rollouts[int(seq_rollout[s])]["seqs"].append([(float(logp[s, t]), float(old[s, t]), float(ref[s, t]))
                                                      for t in range(T) if mask[s, t]])
    return {"logp": logp.float(), "old": old.float(), "ref": ref.float(), "mask": mask, "adv": adv.float(),
            "seq_rollout": seq_rollout}, rollouts


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
@pytest.mark.parametrize("beta,seqs", [(0.04, 1), (0.0, 1), (0.1, 2)])
def test_loss_equals_float64(aggregation, beta, seqs):
    """Two micro-batches (the normalisers span both), clipping active (old != current), masks, a zero-variance
    group; seqs=2 is the focus task's two sequences per rollout."""
    micro = [random_micro(s, 6, seqs) for s in (1, 2)]
    n_rollouts = sum(len(r) for _, r in micro)
    n_tokens = int(sum(m["mask"].sum() for m, _ in micro))
    max_tokens = 9 * seqs
    total = 0.0
    for m, _ in micro:
        w = grpo.token_weights(m["seq_rollout"], m["mask"], aggregation, n_rollouts, n_tokens, max_tokens)
        loss, stats = grpo.grpo_loss(m["logp"], m["old"], m["ref"], m["adv"][m["seq_rollout"]], m["mask"], w, beta,
                                     0.2, 0.28)
        assert loss.dtype == torch.float32
        total += float(loss)
    want = float64_step_loss([r for _, r in micro], aggregation, beta, 0.2, 0.28, max_tokens)
    assert total == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_kl_is_float32_and_finite_for_large_gaps():
    logp = torch.tensor([[-0.1, -80.0, -1.0]]).bfloat16().float()
    ref = torch.tensor([[-90.0, -0.1, -1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = grpo.grpo_loss(logp, logp, ref, torch.zeros(1), mask, torch.ones(1), 1.0, 0.2, 0.2)
    assert math.isfinite(float(loss)) and math.isfinite(stats["kl"]) and stats["kl"] > 0


def test_one_update_gradient_is_reinforce_with_group_baseline():
    """At one update per generation (old = current, detached) and beta 0, the GRPO gradient is
    -sum_i A_i / (N |o_i|) * grad sum_t log pi(o_it): REINFORCE with the group mean as baseline."""
    m, _ = random_micro(5, 8, 1)
    for agg in grpo.AGGREGATIONS:
        logp = m["logp"].clone().requires_grad_(True)
        n_tokens = int(m["mask"].sum())
        w = grpo.token_weights(m["seq_rollout"], m["mask"], agg, 8, n_tokens, 9)
        loss, _ = grpo.grpo_loss(logp, logp.detach(), None, m["adv"], m["mask"], w, 0.0, 0.2, 0.2)
        loss.backward()
        lengths = m["mask"].sum(-1).clamp(min=1).float()
        scale = {"seq-mean-token-mean": 1 / (8 * lengths), "token-mean": torch.full((8,), 1 / n_tokens),
                 "dr-grpo": torch.full((8,), 1 / (8 * 9))}[agg]
        want = -(m["adv"] * scale)[:, None] * m["mask"].float()
        torch.testing.assert_close(logp.grad, want)


# ------------------------------------------------------------------------------- rollouts on a real model

@pytest.fixture(scope="module")
def policy(toy):
    processor = common.load_processor(str(toy / "qwen2-vl"))
    model = common.load_model(str(toy / "qwen2-vl")).eval()
    return model, processor


def rollout_args(**kw):
    return SimpleNamespace(**{"task": "grounding", "prompt_set": "visrl", "box_format": "viscot", "max_new_tokens": 6,
                              "temperature": 1.0, "rewards": ["grounding_iou"], "reward_weights": [1.0],
                              "rule_metric": "f1", "box_must_end": True, "math_verify": False, **kw})


def test_rollouts_stay_aligned_with_their_prompts_and_images(toy, policy):
    """B = 3 prompts with different images x G = 4: every rollout's sequence carries its own prompt's
    encoding and its own image's features, and per-sequence log-probs of the whole B x G batch (after a
    generate of another batch size: trap 11) equal each sequence scored alone from a fresh encode of its
    own record with pixel_values (trap 1: no repeated-pixels mix-up)."""
    model, processor = policy
    root = str(toy / "data")
    prompts = grpo.read_prompts(str(toy / "data" / "train.jsonl"), root, "grounding")[:3]
    images = grpo.load_images(prompts, root)
    assert len({im.tobytes() for im in images}) == 3
    torch.manual_seed(0)
    G = 4
    rollouts = grpo.rollout(model, processor, prompts, images, rollout_args(), G, True)
    assert [r["prompt"] for r in rollouts] == [k // G for k in range(3 * G)]
    own = common.image_features(model, processor, images)
    for r in rollouts:
        torch.testing.assert_close(r["seqs"][0]["features"][0], own[r["prompt"]])
    seqs = [r["seqs"][0] for r in rollouts]
    together, mask = grpo.sequence_logps(model, model, processor, seqs, 1.0, "cpu", reuse_features=True)
    recomputed, _ = grpo.sequence_logps(model, model, processor, seqs, 1.0, "cpu", reuse_features=False)
    torch.testing.assert_close(recomputed, together, rtol=1e-4, atol=1e-4)
    for k, (r, s) in enumerate(zip(rollouts, seqs)):
        p = prompts[r["prompt"]]
        enc = common.encode(processor, common.Example(p["rec"], root, grpo.first_messages(p, "grounding", "visrl")))
        batch = common.collate(grpo.train_batch([{"enc": enc, "ids": s["ids"]}]), processor.tokenizer.pad_token_id)
        with torch.no_grad():
            alone, m1 = common.token_logprobs(model, batch)
        n = int(m1.sum())
        assert n == len(s["ids"]) == int(mask[k].sum())
        torch.testing.assert_close(together[k][mask[k]], alone[0][m1[0]], rtol=1e-4, atol=1e-4)
    # Rewards follow their own record: each rollout is scored against its own prompt's box.
    per_fn, total = grpo.score(rollouts, prompts, rollout_args())
    for k, r in enumerate(rollouts):
        rec = prompts[r["prompt"]]["rec"]
        want = grpo.REWARDS["grounding_iou"]([r["text"]], width=[rec["width"]], height=[rec["height"]],
                                             bbox=[rec["bbox"]])
        assert per_fn["grounding_iou"][k] == want[0] == total[k]


@pytest.mark.parametrize("box_step", ["ended", "unended", "unended, --no-box_must_end"])
def test_focus_rollout_crops_its_own_box(toy, policy, box_step):
    """The focus chain: a rollout with a parseable box gets a second sequence whose second image is the crop
    of that box from its own image; one without gets none and scores 0. A box step that ran out of tokens
    (a box, then text to --max_new_tokens) has no box by default: seed 0's pipeline GRPO spent steps 7-25
    with up to 97 % of its box steps writing on after the box, free while the reward read the box alone."""
    model, processor = policy
    root = str(toy / "data")
    prompts = grpo.read_prompts(str(toy / "data" / "train.jsonl"), root, "focus")[:2]
    images = grpo.load_images(prompts, root)
    # An untrained model writes no box: force one through the parse step to exercise the crop path.
    w, h = images[1].size
    box_text = common.box_to_text([0, 0, w / 2, h / 2], "viscot", w, h)
    real_generate = common.generate_encoded
    calls = []

    def scripted(module, processor_, encoded, **kw):
        calls.append(len(encoded))
        if len(calls) == 1:  # step 1: the box
            ids = processor_.tokenizer(box_text, add_special_tokens=False)["input_ids"] + \
                [processor_.tokenizer.eos_token_id]
            if box_step != "ended":  # no end of turn: text after the box to the token budget
                ids = ids[:-1] + processor_.tokenizer("0.1", add_special_tokens=False)["input_ids"]
            return [{"prompt_tokens": len(e["input_ids"]), "ids": ids, "stopped": box_step == "ended"}
                    for e in encoded]
        return real_generate(module, processor_, encoded, **kw)

    common.generate_encoded, saved = scripted, common.generate_encoded
    try:
        rollouts = grpo.rollout(model, processor, prompts, images,
                                rollout_args(task="focus", box_must_end="no-" not in box_step), 2, True)
    finally:
        common.generate_encoded = saved
    if box_step == "unended":
        assert calls == [4] and all(r["box"] is None and len(r["seqs"]) == 1 for r in rollouts)
        assert grpo.score(rollouts, prompts, rollout_args(task="focus", rewards=["answer"]))[1] == [0.0] * 4
        return
    assert calls == [4, 4]
    for r in rollouts:
        assert r["box"] is not None and len(r["seqs"]) == 2
        crop = r["seqs"][1]["images"][1]
        assert crop.tobytes() == images[r["prompt"]].crop(tuple(r["crop"])).tobytes()
        assert r["seqs"][1]["images"][0] is images[r["prompt"]]
    args = rollout_args(task="focus", rewards=["answer"])
    unparsable = [dict(rollouts[0], box=None, text=prompts[rollouts[0]["prompt"]]["rec"]["answer"])]
    per_fn, total = grpo.score(unparsable, prompts, args)
    assert per_fn == {"answer": [0.0]} and total == [0.0]  # the right answer after no box earns nothing


def test_vision_tokens_never_reach_training(policy):
    _, processor = policy
    vision = set(processor.tokenizer.convert_tokens_to_ids(list(common.VISION_TOKENS)))
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert common.cut_vision_tokens([5, 6, pad, 7], vision) == ([5, 6], True)
    assert common.cut_vision_tokens([5, 6, 7], vision) == ([5, 6, 7], False)


def lora_policy(toy, dtype):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = get_peft_model(common.load_model(str(toy / "qwen2-vl"), dtype=dtype),
                           LoraConfig(r=4, target_modules=common.LM_ONLY_TARGETS)).eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # B starts at 0: make the adapter do something
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_merged_generation_restores_the_weights_exactly(toy, dtype):
    """Afterwards every weight is bit for bit what it was (in bf16 an unmerge alone would not be). In float32
    the merged model generates the unmerged model's tokens; in bf16 the merge rounds, so greedy near-ties may
    go either way (as with any separate generation engine), and only the restore is checked."""
    processor = common.load_processor(str(toy / "qwen2-vl"))
    model = lora_policy(toy, dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = grpo.read_prompts(str(toy / "data" / "train.jsonl"), str(toy / "data"), "grounding")[:3]
    images = grpo.load_images(prompts, str(toy / "data"))
    args = rollout_args(max_new_tokens=8)
    plain = grpo.rollout(model, processor, prompts, images, args, 1, False)
    with grpo.lora_merged(model, True):
        merged = grpo.rollout(model, processor, prompts, images, args, 1, False)
        assert all(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))
    if dtype == torch.float32:
        assert [r["seqs"][0]["ids"] for r in merged] == [r["seqs"][0]["ids"] for r in plain]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))


# ---------------------------------------------------------------------------------------- the script

def grpo_args(toy, out, *extra):
    return ["--model", str(toy / "qwen2-vl"), "--data", str(toy / "data" / "train.jsonl"), "--output_dir", str(out),
            "--task", "grounding", "--num_generations", "4", "--batch_size", "2", "--max_new_tokens", "8",
            "--lr", "1e-3", "--seed", "3", "--log_steps", "1", "--sample_steps", "1", *extra]


def length_reward(completions, **_):
    """A reward an untrained model's outputs differ in, so groups have variance and the weights move."""
    return [float(len(c) % 5) for c in completions]


def metric_rows(out):
    drop = ("samples_per_s", "generation_share")
    return [{k: v for k, v in r.items() if k not in drop} for r in common.read_jsonl(str(out / "metrics.jsonl"))]


def test_script_trains_logs_and_resumes_exactly(toy, tmp_path, monkeypatch):
    monkeypatch.setitem(grpo.REWARDS, "length", length_reward)
    extra = ("--rewards", "length,grounding_giou", "--reward_weights", "1,0.5", "--max_steps", "4",
             "--num_iterations", "2", "--beta", "0.1", "--eval_data", str(toy / "data" / "test.jsonl"))
    grpo.main(grpo_args(toy, tmp_path / "straight", *extra))
    rows = metric_rows(tmp_path / "straight")
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("reward", "rewards/length/mean", "rewards/grounding_giou/std", "frac_zero_std_groups", "kl",
                "clip_fraction", "entropy", "completion_length", "truncated", "lr", "grad_norm"):
        assert all(math.isfinite(r[key]) for r in train), key
    assert train[-1]["kl"] > 0  # the policy moved away from the reference
    assert sum(r["clip_fraction"] for r in train) > 0  # the second update of each batch is clipped somewhere
    assert [r["step"] for r in rows if "eval_reward" in r] == [0, 4]
    samples = common.read_jsonl(str(tmp_path / "straight" / "samples.jsonl"))
    assert len(samples) == 4 and len(samples[0]["completions"]) == 4
    assert set(samples[0]["completions"][0]["rewards"]) == {"length", "grounding_giou"}

    # Interrupted after step 2 (a checkpoint there), resumed: the same steps, metrics and samples.
    calls = {"n": 0}

    def dies_in_step_3(completions, **_):
        calls["n"] += 1
        if calls["n"] == 4:  # eval, step 1, step 2, then step 3
            raise KeyboardInterrupt
        return length_reward(completions)

    monkeypatch.setitem(grpo.REWARDS, "length", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        grpo.main(grpo_args(toy, tmp_path / "resumed", *extra, "--save_steps", "2"))
    monkeypatch.setitem(grpo.REWARDS, "length", length_reward)
    grpo.main(grpo_args(toy, tmp_path / "resumed", *extra, "--save_steps", "2", "--resume", "latest"))
    got = metric_rows(tmp_path / "resumed")
    assert [r["step"] for r in got] == [r["step"] for r in rows]
    for a, b in zip(got, rows):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    assert common.read_jsonl(str(tmp_path / "resumed" / "samples.jsonl")) == samples


def test_reused_batches_take_old_logprobs_from_the_first_update(toy, tmp_path, monkeypatch):
    """With two updates per batch the first update's forward gives the old log-probs: the same steps as with the
    separate forward that dropout needs (weights not yet moved, so the two differ by rounding only)."""
    monkeypatch.setitem(grpo.REWARDS, "length", length_reward)
    extra = ("--rewards", "length", "--max_steps", "3", "--num_iterations", "2", "--beta", "0.1")
    grpo.main(grpo_args(toy, tmp_path / "reused", *extra))
    monkeypatch.setattr(grpo, "dropout_active", lambda model: True)
    grpo.main(grpo_args(toy, tmp_path / "separate", *extra))
    reused, separate = metric_rows(tmp_path / "reused"), metric_rows(tmp_path / "separate")
    assert sum(r["clip_fraction"] for r in reused) > 0  # the second updates' ratios move off 1
    for a, b in zip(reused, separate):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


def test_dropout_active_sees_lora_and_attention_dropout(toy):
    model = common.load_model(str(toy / "qwen2-vl"))
    assert not grpo.dropout_active(model)
    model.config.text_config.attention_dropout = 0.1
    assert grpo.dropout_active(model)
    model.config.text_config.attention_dropout = 0.0
    for lora_dropout, active in (("0", False), ("0.05", True)):
        args = grpo.parse_args(["--model", str(toy / "qwen2-vl"), "--data", "x", "--output_dir", "y", "--finetune",
                                "lora", "--lora_dropout", lora_dropout])
        lora = common.prepare_for_training(common.load_model(str(toy / "qwen2-vl")), args)
        assert grpo.dropout_active(lora) == active


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed-zero3"])
def test_launchers(toy, tmp_path, launcher):
    """Two CPU ranks: data parallel, and ZeRO-3 (partitioned weights; generation with every rank in step)."""
    env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29641"]
        extra = []
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29642"]
        # The focus task (two generate calls per step on gathered weights) and a reference model with its own
        # inference engine.
        extra = ["--deepspeed", os.path.join(ROOT, "configs", "zero3.json"), "--finetune", "full", "--task", "focus"]
    run_script(*cmd, os.path.join(ROOT, "grpo.py"), *grpo_args(toy, tmp_path / "out", "--max_steps", "2",
                                                               "--batch_size", "1", *extra), env=env)
    rows = common.read_jsonl(str(tmp_path / "out" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert os.path.isdir(tmp_path / "out" / "final")


def test_bad_input_names_file_and_line(toy, tmp_path):
    good = common.read_jsonl(str(toy / "data" / "train.jsonl"))[:2]
    cases = {
        "malformed": (['{"id": "a"', None], "bad.jsonl:1: not valid JSON"),
        "no_solution": ([{"image": good[0]["image"], "problem": "find it"}], "bad.jsonl:1: the detection task needs"),
        "missing_image": ([dict(good[0], image="images/nope.png")], "cannot load image"),
    }
    with pytest.raises(common.DataError, match="nope.jsonl: no such file"):
        grpo.read_prompts(str(tmp_path / "nope.jsonl"), str(toy / "data"), "grounding")
    for name, (rows, message) in cases.items():
        path = tmp_path / "bad.jsonl"
        with open(path, "w") as f:
            for row in rows:
                if row is not None:
                    f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
        with pytest.raises(common.DataError, match=message):
            grpo.read_prompts(str(path), str(toy / "data"), "detection" if name == "no_solution" else "grounding")


def test_policy_gain_is_the_advantage_weighted_log_prob_change():
    """tools/policy_gain.py's measure by hand: per question the mean of advantage * change over its rollouts, then
    the mean over questions and its standard error."""
    from tools import policy_gain
    advantages = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, -0.5], dtype=torch.float64)
    question = torch.tensor([0, 0, 3, 3, 5, 5])
    change = torch.tensor([0.5, -1.0, 0.0, -1.0, 2.0, 2.0], dtype=torch.float64)
    per_question = [(0.5 + 1.0) / 2, (0.0 + 2.0) / 2, (1.0 - 1.0) / 2]
    mean = sum(per_question) / 3
    se = (sum((x - mean) ** 2 for x in per_question) / 2 / 3) ** 0.5
    gain, gain_se, better, worse = policy_gain.weighted_change(advantages, question, change)
    assert gain == pytest.approx(mean) and gain_se == pytest.approx(se)
    assert better == pytest.approx((0.5 + 0.0 + 2.0) / 3) and worse == pytest.approx((-1.0 - 1.0 + 2.0) / 3)
    assert policy_gain.question_gains(advantages, question, change).tolist() == pytest.approx(per_question)
    # --against: another model's gains subtracted per question (the same rollouts), mean and standard error
    control = torch.tensor([0.0, 0.0, 1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    paired = [p - c for p, c in zip(per_question, [0.0, (2.0 - 2.0) / 2, (-0.5 - 0.5) / 2])]
    diff, diff_se = policy_gain.mean_and_se(policy_gain.question_gains(advantages, question, change) -
                                            policy_gain.question_gains(advantages, question, control))
    paired_mean = sum(paired) / 3
    assert diff == pytest.approx(paired_mean)
    assert diff_se == pytest.approx((sum((x - paired_mean) ** 2 for x in paired) / 2 / 3) ** 0.5)
    with pytest.raises(ValueError, match="no group with a reward spread"):
        policy_gain.weighted_change(torch.zeros(0, dtype=torch.float64), torch.zeros(0), torch.zeros(0))


def test_sampled_rewards_split_the_total_by_reward():
    """policy_gain's direct measure reports the run's total and, with several rewards, each alone, scored as the
    total is (an unusable rollout scores 0 in every one), so a zoom run's answers are told from its tool bonus;
    zoom_format puts a wrong answer above a broken call."""
    from tools import policy_gain
    args = grpo.parse_args(["--task", "zoom", "--model", "m", "--data", "d", "--output_dir", os.devnull,
                            "--num_generations", "2", "--rewards", "answer,zoom_tool", "--rule_metric", "exact"])
    prompts = [{"rec": {"answer": "circle"}}, {"rec": {"answer": "square"}}]
    rollouts = [{"prompt": p, "text": t, "invalid": bad, "box": None, "calls": calls}
                for p, t, bad, calls in [(0, "<answer>circle</answer>", False, 1), (0, "square", False, 0),
                                         (1, "square", False, 0), (1, "square", True, 1)]]
    total = policy_gain.rollout_rewards(rollouts, prompts, args)
    assert total.tolist() == [[2.0, 0.0], [1.0, 0.0]]
    got = policy_gain.question_rewards(rollouts, prompts, args, total)
    assert {k: v.tolist() for k, v in got.items()} == {"total": [1.0, 0.5], "answer": [0.5, 0.5],
                                                       "zoom_tool": [0.5, 0.0]}
    formatted = grpo.parse_args(["--task", "zoom", "--model", "m", "--data", "d", "--output_dir", os.devnull,
                                 "--num_generations", "2", "--rewards", "answer,zoom_format", "--rule_metric", "exact"])
    assert policy_gain.rollout_rewards(rollouts, prompts, formatted).tolist() == [[2.0, 1.0], [2.0, 0.0]]
    one = grpo.parse_args(["--task", "focus", "--model", "m", "--data", "d", "--output_dir", os.devnull,
                           "--num_generations", "2"])
    assert policy_gain.question_rewards(rollouts, prompts, one, total).keys() == {"total"}


def test_policy_gain_of_a_model_against_itself_is_zero(toy, capsys):
    """The tool on the toy: sampled rollouts keep their prompts' order, each rollout's log-prob is finite and
    the same under a second load of the same weights (and, to rounding, in another batching or with the
    rollouts' own vision features), so the measured gain is exactly 0; main runs end to end, for focus and for zoom."""
    from tools import policy_gain
    model_dir, data = str(toy / "qwen2-vl"), str(toy / "data" / "test.jsonl")
    args = grpo.parse_args(["--task", "focus", "--model", model_dir, "--data", data, "--output_dir", os.devnull,
                            "--num_generations", "2", "--max_new_tokens", "32"])
    prompts = grpo.read_prompts(data, str(toy / "data"), "focus")[:3]
    processor, model = common.load_processor(model_dir), common.load_model(model_dir).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        rollouts, rewards = policy_gain.sample_rollouts(model, processor, prompts,
                                                        grpo.load_images(prompts, str(toy / "data")), args, chunk=2)
    assert [r["prompt"] for r in rollouts] == [0, 0, 1, 1, 2, 2] and rewards.shape == (3, 2)
    first = policy_gain.rollout_logps(model, processor, rollouts, 1.0)
    again = policy_gain.rollout_logps(common.load_model(model_dir).eval(), processor, rollouts, 1.0)
    assert torch.isfinite(first).all() and (first < 0).all() and torch.equal(first, again)
    assert torch.allclose(first, policy_gain.rollout_logps(model, processor, rollouts, 1.0, chunk=1), atol=1e-4)
    assert policy_gain.weighted_change(torch.ones(6), torch.arange(6), again - first)[0] == 0.0
    # The rollouts' own vision features stand in for a second pass of an unchanged vision tower; a model whose
    # vision weights changed runs its own.
    reused = policy_gain.rollout_logps(model, processor, rollouts, 1.0, reuse_features=True)
    assert torch.allclose(first, reused, atol=1e-4)
    signs = torch.tensor([1.0, -1.0] * 3, dtype=torch.float64)
    held_out = {"processor": processor, "temperature": 1.0, "rollouts": rollouts, "advantages": signs,
                "question": torch.arange(6), "vision": policy_gain.vision_weights(model), "start_logps": reused}
    assert policy_gain.policy_gain(held_out, model)[0] == 0.0
    other = common.load_model(model_dir).eval()
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if common.is_vision_param(n)).mul_(1.5)
    change = policy_gain.rollout_logps(other, processor, rollouts, 1.0) - reused
    assert change.abs().max() > 1e-3
    assert policy_gain.policy_gain(held_out, other) == policy_gain.weighted_change(signs, torch.arange(6), change)
    policy_gain.main(["--start", model_dir, "--trained", model_dir, "--questions", data, "--n", "4",
                      "--num_generations", "4", "--reward_n", "4"])
    out = capsys.readouterr().out
    assert "rollouts have a non-zero advantage (4 questions)" in out
    assert "sampled reward on 4 questions 0.0000 -> 0.0000, +0.0000 ± 0.0000" in out
    # The direct measure: an unchanged model, sampling with the probe's seed and batching, draws the start's
    # rollouts again, so its reward change is exactly 0.
    held_out = policy_gain.probe(model_dir, data, str(toy / "data"), 4, 2, 0, ["--max_new_tokens", "32"])
    change, change_se, before, after = policy_gain.sampled_reward_change(held_out, common.load_model(model_dir), 4)
    assert change == 0.0 and change_se == 0.0 and before == after
    with pytest.raises(SystemExit, match="--against .*: not one of --trained"):
        policy_gain.main(["--start", model_dir, "--trained", model_dir, "--against", data, "--questions", data])
    for reward_n in ("20", "40"):  # a last batch the probe did not draw, or more questions than it has
        with pytest.raises(SystemExit, match=rf"--reward_n {reward_n}: must be --n \(24\) or a multiple of 16 below"):
            policy_gain.main(["--start", model_dir, "--trained", model_dir, "--questions", data, "--n", "24",
                              "--reward_n", reward_n])
    policy_gain.main(["--task", "zoom", "--start", model_dir, "--trained", model_dir, "--questions", data, "--n", "2",
                      "--num_generations", "2", "--max_turns", "2", "--max_new_tokens", "16", "--reward_n", "2",
                      "--rewards", "answer,zoom_tool"])
    out = capsys.readouterr().out
    assert "rollouts have a non-zero advantage (2 questions)" in out
    for line in ("sampled reward on 2 questions", "sampled reward answer on 2", "sampled reward zoom_tool on 2"):
        assert f"{line}" in out and "+0.0000 ± 0.0000" in out.split(line)[1].splitlines()[0]


def test_a_reference_checkpoint_sees_the_images_through_its_own_vision_tower(toy, tmp_path, monkeypatch):
    """--reference model --ref_model DIR: the reference's log-probs come from its own vision tower, not from
    the policy's features (reused for the policy alone while its tower is frozen). A reference that differs
    from the starting model only in its vision tower has a KL above 0 at the first step; an identical copy
    has none."""
    monkeypatch.setitem(grpo.REWARDS, "length", length_reward)
    model = common.load_model(str(toy / "qwen2-vl"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if common.is_vision_param(name):
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    first_kl = {}
    for name in ("copy", "other_vision"):
        ref = tmp_path / name
        shutil.copytree(toy / "qwen2-vl", ref)
        if name == "other_vision":
            model.save_pretrained(ref)
        grpo.main(grpo_args(toy, tmp_path / f"run_{name}", "--rewards", "length", "--max_steps", "1", "--beta",
                            "0.1", "--reference", "model", "--ref_model", str(ref)))
        first_kl[name] = metric_rows(tmp_path / f"run_{name}")[0]["kl"]
    assert first_kl["copy"] < 1e-6 < 1e-4 < first_kl["other_vision"], first_kl
