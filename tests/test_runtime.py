"""Runtime pieces without a launcher: data order, schedule, checkpoint discovery."""
import argparse
import json
import math
import os

import pytest
import torch

import common


def test_step_indices_cover_each_epoch_once_and_are_reproducible():
    n, batch = 50, 8
    per_epoch = n // batch
    for epoch in range(3):
        seen = [i for s in range(epoch * per_epoch, (epoch + 1) * per_epoch) for i in common.step_indices(n, s, batch, 7)]
        assert len(seen) == len(set(seen)) == per_epoch * batch
    assert common.step_indices(n, 4, batch, 7) == common.step_indices(n, 4, batch, 7)
    assert common.step_indices(n, 0, batch, 7) != common.step_indices(n, per_epoch, batch, 7)  # reshuffled
    assert common.step_indices(n, 0, batch, 7) != common.step_indices(n, 0, batch, 8)


def schedule(total, warmup_ratio=0.1, min_lr_ratio=0.1, lr=1.0):
    args = argparse.Namespace(deepspeed=None, seed=0, dtype="fp32", lr=lr, weight_decay=0.0,
                              warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio, max_grad_norm=1.0, grad_accum=1)
    rt = common.Runtime(args, "test")
    rt.setup(torch.nn.Linear(2, 2), total)
    lrs = []
    for _ in range(total):
        lrs.append(rt.lr())
        rt.optimizer.step()
        rt.scheduler.step()
    return lrs


def test_warmup_then_cosine_to_the_floor():
    lrs = schedule(100)
    warm = lrs[:10]
    assert warm == sorted(warm) and warm[0] < 0.2 and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    progress = 45 / 90
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))


def test_resume_latest_ignores_unfinished_checkpoints(tmp_path):
    for name in ("checkpoint-3", "checkpoint-6", "checkpoint-9.tmp", "checkpoint-x", "final"):
        os.makedirs(tmp_path / name)
    args = argparse.Namespace(resume="latest", output_dir=str(tmp_path), finetune="lora")
    assert common.resolve_resume(args, "sft", 10) == str(tmp_path / "checkpoint-6")
    assert common.resolve_resume(argparse.Namespace(resume="latest", output_dir=str(tmp_path / "none")), "sft",
                                 10) is None
    common.prune_checkpoints(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-6", "checkpoint-9.tmp", "checkpoint-x", "final"]


def test_resume_refuses_another_stage_another_finetune_or_a_checkpoint_past_the_end(tmp_path):
    ckpt = tmp_path / "checkpoint-6"
    os.makedirs(ckpt)
    (ckpt / "training_state.pt").write_bytes(b"")
    (ckpt / common.CHECKPOINT_INFO).write_text(json.dumps({"stage": "rl_stage1", "finetune": "lora", "step": 6}))
    for resume in ("latest", str(ckpt)):
        args = argparse.Namespace(resume=resume, output_dir=str(tmp_path), finetune="lora", model="m")
        assert common.resolve_resume(args, "rl_stage1", 7) == str(ckpt)
        with pytest.raises(common.DataError, match=r"checkpoint-6: a checkpoint of rl_stage1, not of rl_stage2$"):
            common.resolve_resume(args, "rl_stage2", 7)
        assert common.resolve_resume(args, "rl_stage1", 6) == str(ckpt)  # only final/ left to write
        with pytest.raises(common.DataError, match=r"at step 6, past this run's last step 5"):
            common.resolve_resume(args, "rl_stage1", 5)
        with pytest.raises(common.DataError, match=r"trained with --finetune lora, this run has --finetune full$"):
            common.resolve_resume(argparse.Namespace(resume=resume, output_dir=str(tmp_path), finetune="full",
                                                     model="m"), "rl_stage1", 7)


def test_resume_from_an_earlier_checkpoint_refuses_while_later_ones_are_there(tmp_path):
    for step in (3, 6):
        os.makedirs(tmp_path / f"checkpoint-{step}")
        (tmp_path / f"checkpoint-{step}" / "training_state.pt").write_bytes(b"")
    args = argparse.Namespace(resume=str(tmp_path / "checkpoint-3"), output_dir=str(tmp_path), finetune="lora")
    with pytest.raises(common.DataError, match=r"checkpoint-3: --output_dir holds later checkpoints \(checkpoint-6\)"):
        common.resolve_resume(args, "sft", 10)
    args.resume = str(tmp_path / "checkpoint-6")
    assert common.resolve_resume(args, "sft", 10) == args.resume


def test_resume_refuses_a_checkpoint_drawn_in_another_data_order(tmp_path):
    order = {"items": 40, "global_batch": 8, "seed": 0, "data": "0123456789abcdef"}
    ckpt = tmp_path / "checkpoint-6"
    os.makedirs(ckpt)
    (ckpt / "training_state.pt").write_bytes(b"")
    (ckpt / common.CHECKPOINT_INFO).write_text(json.dumps({"stage": "sft", "finetune": "lora", "step": 6,
                                                           "order": order}))
    args = argparse.Namespace(resume="latest", output_dir=str(tmp_path), finetune="lora", model="m")
    assert common.resolve_resume(args, "sft", 10, dict(order)) == str(ckpt)
    for change, shown in (({"global_batch": 4}, "global_batch 8 -> 4"), ({"seed": 7}, "seed 0 -> 7"),
                          ({"items": 41, "data": "fedcba9876543210"},
                           "items 40 -> 41, data '0123456789abcdef' -> 'fedcba9876543210'")):
        with pytest.raises(common.DataError, match=rf"checkpoint-6: drawn in another data order \({shown}\), so"):
            common.resolve_resume(args, "sft", 10, dict(order, **change))


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_a_frozen_reference_takes_the_policys_dtype_name_by_name(toy, finetune):
    """Outside DeepSpeed setup() keeps the policy's trainable weights in float32 while the rest stays in the
    loading dtype; under autocast embeddings, norms and LoRA run in their weight's dtype, so the reference
    (loaded in bf16, a LoRA adapter in float32 by PEFT) must take the policy's dtype for each weight, or the
    first step's KL is not 0. Here a plain reference against a LoRA policy and a fully fine-tuned one."""
    path = str(toy / "qwen2-vl")
    args = argparse.Namespace(deepspeed=None, seed=0, dtype="bf16", lr=1e-4, weight_decay=0.0, warmup_ratio=0.0,
                              min_lr_ratio=0.0, max_grad_norm=1.0, grad_accum=1, finetune=finetune)
    policy = common.load_model(path, torch.bfloat16)
    if finetune == "lora":
        from peft import LoraConfig, get_peft_model
        policy = get_peft_model(policy, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    else:  # the language model trained, the vision tower frozen
        for name, p in policy.named_parameters():
            p.requires_grad_(not common.is_vision_param(name))
    rt = common.Runtime(args, "test")
    rt.setup(policy, 10)
    reference = rt.frozen(common.load_model(path, torch.bfloat16))
    want = {common.plain_name(n): p.dtype for n, p in rt.module.named_parameters()}
    got = {n: p.dtype for n, p in reference.named_parameters()}
    assert set(got) <= set(want) and all(got[n] == want[n] for n in got)
    assert {torch.float32, torch.bfloat16} == set(want.values())  # trainable and frozen weights differ
