"""bench/dpo_vs_trl.py ARCHS: each released model's shapes, built on its family's toy model, make a model of the
released size (on the meta device: no weights are drawn), with the family's structure kept."""
import argparse
import os
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import dpo_vs_trl  # noqa: E402

# parameters (billions, 2 decimals) of the released checkpoints: Qwen2-VL-2B 2.21, Qwen3-VL-8B 8.77; Qwen3.5-9B-style
# is transformers' default Qwen3_5Config shapes
SIZES = {"qwen2-vl-2b": 2.21, "qwen3-vl-8b": 8.77, "qwen3.5-9b": 9.41}


@pytest.mark.parametrize("arch", sorted(dpo_vs_trl.ARCHS))
def test_released_shapes_give_the_released_size(toy, arch):
    config = dpo_vs_trl.released_config(str(toy), arch)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == SIZES[arch]
    assert config.model_type == {"qwen2-vl": "qwen2_vl", "qwen3-vl": "qwen3_vl",
                                 "qwen3.5": "qwen3_5"}[dpo_vs_trl.ARCHS[arch]["toy"]]
    if arch == "qwen3.5-9b":  # the hybrid stays hybrid
        assert set(config.text_config.layer_types) == {"linear_attention", "full_attention"}


@pytest.mark.parametrize("bench,args", [
    ("gen_pairs_throughput.py", ("--data", "train.jsonl", "--n", "2", "--batch_size", "2", "--attempts", "1",
                                 "--max_new_tokens", "4")),
    ("infer_throughput.py", ("--data", "test.jsonl", "--n", "2", "--max_new_tokens", "4")),
    ("shared_prefix.py", ("--data", "questions.jsonl", "--prompts", "2", "--num_generations", "2", "--repeats", "1")),
])
def test_benches_run(run, toy, bench, args):
    """The benches that import the stages' helpers run at a tiny size on the toy model (a helper's signature
    change once broke two of them without a test noticing). Their numbers are not asserted: speed is
    measured in bench/, never in tests."""
    args = [str(toy / "data" / a) if a.endswith(".jsonl") else a for a in args]
    p = run(os.path.join("bench", bench), "--model", str(toy / "qwen2-vl"), *args)
    assert p.rc == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]


def test_a_bench_replaces_only_a_work_folder_a_bench_made(tmp_path):
    """--work is emptied for a run only when missing, empty or marked by an earlier bench run: a folder holding
    other files is refused and kept; --steps below 3 (nothing left to time after the warm-up) is refused."""
    parser = argparse.ArgumentParser()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit):
        dpo_vs_trl.fresh_work(parser, str(mine))
    assert (mine / "notes.txt").read_text() == "keep"
    work = tmp_path / "work"
    dpo_vs_trl.fresh_work(parser, str(work))
    (work / "model").mkdir()
    dpo_vs_trl.fresh_work(parser, str(work))
    assert os.listdir(work) == [".bench_work"]
    with pytest.raises(SystemExit):
        dpo_vs_trl.check_steps(parser, 2)
    dpo_vs_trl.check_steps(parser, 3)
