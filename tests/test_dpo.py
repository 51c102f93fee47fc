"""rl_stage1.py / rl_stage2.py: the preference losses against a float64 closed form and TRL's DPOTrainer
arithmetic (TRL is a test-only dependency), sequence log-probs of the shared-encode forward against a naive
one-example-at-a-time gather, precomputed against on-the-fly references, the refusals, and stage 2's units.
Learning (preference accuracy rises; a sign-flipped loss fails the same check) is in test_learning.py."""
import json
import math
import os
import shutil
import statistics
import sys
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import FAMILIES, ROOT, run_script

import common
import rl_stage1

# ------------------------------------------------------------------------------------------------ loss


def float64_loss(pc, pr, rc, rr, nc, nr, loss, beta, eps):
    """Each loss from its paper's formula, one pair at a time, in float64 Python arithmetic."""
    out = []
    for a, b, c, d, n_a, n_b in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), nc.tolist(), nr.tolist()):
        h = (a - c) - (b - d)
        logsig = lambda x: -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))  # noqa: E731
        if loss == "sigmoid":
            out.append(-(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h))
        elif loss == "robust":
            out.append((-(1 - eps) * logsig(beta * h) + eps * logsig(-beta * h)) / (1 - 2 * eps))
        elif loss == "hinge":
            out.append(max(0.0, 1 - beta * h))
        else:
            out.append(((a - c) / n_a - (b - d) / n_b - 1 / (2 * beta)) ** 2)
    return out


def random_logps(seed, n=64):
    g = torch.Generator().manual_seed(seed)
    pc, pr = -torch.rand(n, generator=g) * 40, -torch.rand(n, generator=g) * 40
    rc, rr = pc + torch.randn(n, generator=g) * 3, pr + torch.randn(n, generator=g) * 3
    nc, nr = torch.randint(1, 30, (n,), generator=g).float(), torch.randint(1, 30, (n,), generator=g).float()
    return pc, pr, rc, rr, nc, nr


@pytest.mark.parametrize("loss,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.1), ("hinge", 0.0),
                                      ("ipo", 0.0)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_equals_float64_closed_form(loss, eps, beta):
    args = random_logps(hash((loss, eps, beta)) % 1000)
    ours, reward_c, reward_r = rl_stage1.dpo_loss(*args, loss=loss, beta=beta, label_smoothing=eps)
    assert ours.dtype == torch.float32
    assert ours.tolist() == pytest.approx(float64_loss(*args, loss, beta, eps), rel=1e-5, abs=1e-5)
    assert reward_c.tolist() == pytest.approx((beta * (args[0] - args[2])).tolist(), rel=1e-6)
    assert reward_r.tolist() == pytest.approx((beta * (args[1] - args[3])).tolist(), rel=1e-6)


def test_margin_and_its_standard_error_over_pairs():
    """The logged margin is the mean of chosen - rejected implicit rewards and margin_se its sample standard
    deviation over sqrt(pairs), the same when the pairs come in two micro-batches."""
    chosen, rejected = [1.0, 0.5, 0.2, -0.1, 0.9], [0.0, 0.7, -0.3, -0.1, 0.1]
    sums = {}
    for part in (slice(0, 2), slice(2, 5)):
        n = len(chosen[part])
        t = {"losses": torch.zeros(n), "reward_chosen": torch.tensor(chosen[part]),
             "reward_rejected": torch.tensor(rejected[part]), "logp_chosen": torch.zeros(n),
             "logp_rejected": torch.zeros(n)}
        common.add_sums(sums, rl_stage1.metric_sums([{"kind": "box"}] * n, t))
    out = rl_stage1.finish_metrics(sums, "eval_")
    margins = [c - r for c, r in zip(chosen, rejected)]
    assert out["eval_box/margin"] == pytest.approx(statistics.mean(margins), abs=1e-6)
    assert out["eval_box/margin_se"] == pytest.approx(statistics.stdev(margins) / 5 ** 0.5, abs=1e-6)
    # Every kind's keys, whatever the micro-batch holds: ranks all-reduce the sums key by one, so a rank whose
    # pairs have no answer unit (stage 2 allows it) must not hold fewer keys than the others.
    assert set(rl_stage1.metric_sums([{"kind": "box"}] * 3, t)) == set(rl_stage1.metric_sums(
        [{"kind": "box"}, {"kind": "answer"}, {"kind": "box"}], t))
    assert not any(key.startswith("answer/") for key in out)  # an absent kind is not reported as zeros


def test_loss_is_float32_from_bf16_inputs():
    pc, pr, rc, rr, nc, nr = random_logps(3)
    ours, _, _ = rl_stage1.dpo_loss(pc.bfloat16(), pr.bfloat16(), rc, rr, nc, nr)
    assert ours.dtype == torch.float32


def trl_loss(loss, beta, eps, pc, pr, rc, rr, nc, nr):
    """TRL's DPOTrainer._compute_loss on the same log-probs: a stand-in forward returns per-token log-probs
    whose sums are pc/pr over nc/nr completion tokens; TRL's own arithmetic does the rest."""
    from trl import DPOTrainer
    n, T = len(pc), int(max(nc.max(), nr.max())) + 2
    logps = torch.cat([pc, pr])
    counts = torch.cat([nc, nr]).long()
    completion = torch.zeros(2 * n, T)
    per_token = torch.zeros(2 * n, T - 1)
    for i in range(2 * n):
        completion[i, 1:1 + counts[i]] = 1
        per_token[i, :counts[i]] = logps[i] / counts[i]
    zeros = torch.zeros(2 * n, T - 1)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(
            device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss],
        loss_weights=[1.0], beta=beta, label_smoothing=eps, use_weighting=False,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * n, T, dtype=torch.long), "attention_mask": torch.ones(2 * n, T),
              "completion_mask": completion, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    value = DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)
    return float(value), trainer._metrics["train"]


@pytest.mark.parametrize("loss,eps", [("sigmoid", 0.0), ("robust", 0.1), ("hinge", 0.0), ("ipo", 0.0)])
def test_loss_equals_trl(loss, eps):
    args = random_logps(7)
    ours, reward_c, reward_r = rl_stage1.dpo_loss(*args, loss=loss, beta=0.1, label_smoothing=eps)
    theirs, metrics = trl_loss(loss, 0.1, eps, *args)
    assert ours.mean().item() == pytest.approx(theirs, rel=1e-5)
    assert reward_c.mean().item() == pytest.approx(metrics["rewards/chosen"][0], rel=1e-5)
    assert (reward_c > reward_r).float().mean().item() == pytest.approx(metrics["rewards/accuracies"][0])


# ---------------------------------------------------------------------------------------- log-probs

def toy_pairs(toy, tmp_path, n=4):
    """Pairs as filter_pairs.py writes them, from toy records: chosen = the annotated box, rejected = a
    wrong one; answers of different lengths."""
    recs = common.read_records(str(toy / "data" / "train.jsonl"))[:n]
    pairs = []
    for i, r in enumerate(recs):
        wrong = [0, 0, 40 + 10 * i, 30]
        pairs.append({"id": r["id"], "image": r["image"], "question": r["question"], "answer": r["answer"],
                      "width": 224, "height": 168,
                      "chosen_box_text": common.box_to_text(r["bbox"], "viscot", 224, 168, 2),
                      "rejected_box_text": common.box_to_text(wrong, "viscot", 224, 168, 2),
                      "chosen_answer": r["answer"], "rejected_answer": "a much longer wrong answer " * (i % 2 + 1),
                      "chosen_crop": common.crop_box(r["bbox"], 224, 168, 28)})
    path = tmp_path / "pairs.jsonl"
    common.write_jsonl(str(path), pairs)
    return str(path)


def stage_args(path, *extra):
    return rl_stage1.parse_args(["--model", "m", "--data", path, "--output_dir", "o", *extra])


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_encode_logps_equal_naive_one_by_one(toy, tmp_path, family):
    """All units of 4 pairs in one batch (box and answer steps, 1 and 2 images, different lengths, right
    padding), each distinct image encoded once, against each sequence alone with its own pixels through
    the plain forward and a float64 gather of its label tokens."""
    model, processor = common.load_model(str(toy / family)).eval(), common.load_processor(str(toy / family))
    path = toy_pairs(toy, tmp_path)
    units, _ = rl_stage1.read_pairs(path, str(toy / "data"), processor, stage_args(path, "--answer_weight", "0.5"),
                                    need_answers=True)
    assert {u["kind"] for u in units} == {"box", "answer"} and len(units) == 8
    with torch.no_grad():
        logp, mask = rl_stage1.sequence_logps(model, model, processor, units, torch.device("cpu"))
        shared = logp.sum(-1)
        naive = []
        for u in units:
            for ex in (u["chosen"], u["rejected"]):
                b = common.collate([common.encode(processor, ex)], processor.tokenizer.pad_token_id)
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                               pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
                               mm_token_type_ids=b["mm_token_type_ids"]).logits[0, :-1].double()
                labels = b["labels"][0, 1:]
                keep = labels != common.IGNORE_INDEX
                naive.append(torch.log_softmax(logits, -1)[keep].gather(-1, labels[keep, None]).sum().item())
    assert shared.tolist() == pytest.approx(naive, abs=2e-4, rel=1e-5)
    assert mask.sum(-1).tolist() == [u[k].n_labels if k == "chosen" else mask.sum(-1)[2 * i + 1].item()
                                     for i, u in enumerate(units) for k in ("chosen", "rejected")]


def test_preference_sums_leave_out_exactly_the_end_of_turn(toy, tmp_path):
    """--preference_eos exclude: each response's sum lacks one token's log-prob, its last labelled one, and that
    token is the end of turn (<|im_end|>); include is the plain sum. Checked against each sequence alone."""
    model, processor = common.load_model(str(toy / "qwen2-vl")).eval(), common.load_processor(str(toy / "qwen2-vl"))
    path = toy_pairs(toy, tmp_path, n=2)
    units, _ = rl_stage1.read_pairs(path, str(toy / "data"), processor, stage_args(path, "--answer_weight", "0.5"),
                                    need_answers=True)
    end_of_turn = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        logp, mask = rl_stage1.sequence_logps(model, model, processor, units, torch.device("cpu"))
        expected = []
        for u in units:
            for ex in (u["chosen"], u["rejected"]):
                b = common.collate([common.encode(processor, ex)], processor.tokenizer.pad_token_id)
                labels = b["labels"][0, 1:]
                keep = labels != common.IGNORE_INDEX
                assert labels[keep][-1].item() == end_of_turn
                one, _ = common.token_logprobs(model, b)
                expected.append((one[0][keep].sum().item(), one[0][keep][:-1].sum().item()))
    include = rl_stage1.preference_sums(logp, mask, "include").tolist()
    exclude = rl_stage1.preference_sums(logp, mask, "exclude").tolist()
    assert include == pytest.approx([e[0] for e in expected], abs=2e-4)
    assert exclude == pytest.approx([e[1] for e in expected], abs=2e-4)
    assert all(i < x for i, x in zip(include, exclude))  # the end of turn's log-prob is < 0 in every response


def test_vision_tower_runs_once_per_distinct_image(toy, tmp_path):
    model, processor = common.load_model(str(toy / "qwen2-vl")).eval(), common.load_processor(str(toy / "qwen2-vl"))
    path = toy_pairs(toy, tmp_path, n=3)
    units, _ = rl_stage1.read_pairs(path, str(toy / "data"), processor, stage_args(path, "--answer_weight", "0.5"),
                                    need_answers=True)
    calls = []
    hook = model.model.visual.register_forward_hook(
        lambda m, a, kw, out: calls.append((kw["grid_thw"] if "grid_thw" in kw else a[1]).shape[0]), with_kwargs=True)
    try:
        with torch.no_grad():
            rl_stage1.sequence_logps(model, model, processor, units, torch.device("cpu"))
    finally:
        hook.remove()
    assert calls == [6]  # 12 sequences (3 pairs x 2 steps x chosen/rejected), 3 full images + 3 crops


# ------------------------------------------------------------------------------------ references, runs

def run_stage(toy, path, out, *extra):
    rl_stage1.run(["--model", str(toy / "qwen2-vl"), "--data", path, "--image_root", str(toy / "data"),
                   "--output_dir", str(out), "--batch_size", "2", "--max_steps", "2", "--finetune", "full",
                   "--lr", "1e-3", "--eval_fraction", "0", "--answer_weight", "0.5", "--box_weight", "0.5", *extra])
    return common.read_jsonl(str(out / "metrics.jsonl"))


@pytest.mark.parametrize("eos", ["include", "exclude"])
def test_precomputed_reference_equals_a_reference_model(toy, tmp_path, eos):
    """The same two steps with references precomputed once and with a frozen reference model forwarded every
    step: identical losses and rewards, so the cached numbers are the starting model's (with the end of turn
    in the preference or out of it)."""
    path = toy_pairs(toy, tmp_path)
    pre = run_stage(toy, path, tmp_path / "pre", "--preference_eos", eos)
    live = run_stage(toy, path, tmp_path / "live", "--reference", "model", "--preference_eos", eos)
    for a, b in zip(pre, live):
        for key in ("loss", "box/reward_chosen", "answer/reward_rejected", "box/margin"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key  # float32 noise of a log-ratio
    assert pre[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at the first step
    cached = common.read_jsonl(str(tmp_path / "pre" / "reference_logps.jsonl"))
    assert len(cached) == 8 and len({r["key"] for r in cached}) == 8
    with open(tmp_path / "pre" / "reference_logps.made_by.json") as f:  # a resume with others is refused
        stamp = json.load(f)
    assert {"weights", "data", "prompt_set", "preference_eos", "image_root", "dtype", "attn"} <= stamp.keys()


def test_adapter_disabled_reference_refused_with_an_unmerged_adapter():
    with pytest.raises(SystemExit):
        rl_stage1.parse_args(["--model", "m", "--adapter", "a", "--data", "d", "--output_dir", "o",
                              "--reference", "adapter_disabled"])
    args = rl_stage1.parse_args(["--model", "m", "--data", "d", "--output_dir", "o", "--reference", "adapter_disabled"])
    assert args.reference == "adapter_disabled" and args.finetune == "lora"


def test_adapter_disabled_reference_on_a_merged_start_is_the_start(toy, tmp_path):
    """LoRA on a checkpoint: with the adapter off the policy is the starting model, so the first step's loss
    is log 2 exactly, as with precomputed references."""
    path = toy_pairs(toy, tmp_path)
    metrics = run_stage(toy, path, tmp_path / "off", "--finetune", "lora", "--reference", "adapter_disabled",
                        "--lora_dropout", "0")
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


# ------------------------------------------------------------------------------- launchers and resume

PY = sys.executable
BIN = os.path.dirname(PY)
LAUNCHERS = {
    "torchrun": [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", "29621"],
    "deepspeed-zero3": [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", "29622"],
}


def stage2_cmd(toy, path, out, *extra):
    return [os.path.join(ROOT, "rl_stage2.py"), "--model", str(toy / "qwen2-vl"), "--data", path, "--image_root",
            str(toy / "data"), "--output_dir", str(out), "--finetune", "full", "--lr", "1e-3", "--eval_fraction",
            "0", "--max_steps", "3", *extra]


def losses(out):
    by_step = {}
    for row in common.read_jsonl(str(out / "metrics.jsonl")):
        if "loss" in row:
            by_step[row["step"]] = row["loss"]
    return [by_step[s] for s in sorted(by_step)]


@pytest.fixture(scope="module")
def stage2_reference(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("rl2")
    path = toy_pairs(toy, out, n=8)
    run_script(PY, *stage2_cmd(toy, path, out / "run", "--batch_size", "4"))
    return path, losses(out / "run")


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launchers_match_single_process(toy, tmp_path, stage2_reference, launcher):
    """Stage 2 (both terms) on 2 ranks x 2 pairs equals 1 rank x 4 pairs, step by step; under ZeRO-3 every
    rank runs the vision tower on its own images while the weights are partitioned."""
    path, want = stage2_reference
    extra = ["--batch_size", "2"]
    if launcher.startswith("deepspeed"):
        extra += ["--deepspeed", os.path.join(ROOT, "configs", "zero3.json")]
    run_script(*LAUNCHERS[launcher], *stage2_cmd(toy, path, tmp_path / "run", *extra),
               env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert want[0] == pytest.approx(math.log(2), abs=1e-6) and want[-1] != want[0]
    assert losses(tmp_path / "run") == pytest.approx(want, rel=2e-4)


def test_resume_continues_exactly(toy, tmp_path, stage2_reference):
    path, _ = stage2_reference
    full = tmp_path / "full"
    run_script(PY, *stage2_cmd(toy, path, full, "--batch_size", "2", "--max_steps", "6", "--save_steps", "3",
                               "--save_total_limit", "2"))
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoint-6")
    shutil.rmtree(cut / "final")
    # The metrics of a run stopped after its step-3 checkpoint: steps 4-6 must come from the resumed run.
    common.write_jsonl(str(cut / "metrics.jsonl"),
                       [r for r in common.read_jsonl(str(cut / "metrics.jsonl")) if r["step"] <= 3])
    out = run_script(PY, *stage2_cmd(toy, path, cut, "--batch_size", "2", "--max_steps", "6", "--save_steps", "3",
                                     "--resume", "latest")).stdout
    assert "resuming at step 3" in out
    got = {r["step"]: r["loss"] for r in common.read_jsonl(str(cut / "metrics.jsonl")) if "loss" in r}
    want = {r["step"]: r["loss"] for r in common.read_jsonl(str(full / "metrics.jsonl")) if "loss" in r}
    assert [got[s] for s in range(1, 7)] == pytest.approx([want[s] for s in range(1, 7)], rel=1e-5, abs=1e-7)


def test_sft_term_is_in_the_logged_loss(toy, tmp_path):
    """--sft_weight adds the chosen responses' token NLL to the optimised loss, and the log says so."""
    path = toy_pairs(toy, tmp_path)
    first = run_stage(toy, path, tmp_path / "sft", "--sft_weight", "1.0")[0]
    assert first["sft_nll"] > 0.5  # the untrained model does not know the box texts
    assert first["loss"] == pytest.approx(math.log(2) + first["sft_nll"], rel=1e-6)


def test_pairs_without_a_rejected_answer_and_malformed_lines(toy, tmp_path):
    path = toy_pairs(toy, tmp_path)
    rows = common.read_jsonl(path)
    rows[1]["rejected_answer"] = None  # its rejected box did not parse: no answer to compare
    common.write_jsonl(path, rows)
    processor = common.load_processor(str(toy / "qwen2-vl"))
    args = stage_args(path, "--answer_weight", "0.5")
    units, skipped = rl_stage1.read_pairs(path, str(toy / "data"), processor, args, need_answers=True)
    assert skipped["no_answer_pair"] == 1 and [u["kind"] for u in units].count("answer") == 3
    common.write_jsonl(path, rows[:2] + [{"id": "x", "image": "i.png", "question": "q"}])
    with pytest.raises(common.DataError, match=r"pairs.jsonl:3: field 'chosen_box_text' must be a non-empty string"):
        rl_stage1.read_pairs(path, str(toy / "data"), processor, args, need_answers=True)
