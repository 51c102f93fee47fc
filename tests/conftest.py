"""Shared fixtures: a small toy world built once per test session (tiny random Qwen2-VL and Qwen2.5-VL,
synthetic records), with the same builder `bash pipeline.sh` uses."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SAMPLES = os.path.join(ROOT, "..", "shared", "samples", "viscot")


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_toy.py"), "--out", str(out),
                    "--n_train", "64", "--n_test", "16"], check=True, capture_output=True)
    return out


def run_script(*argv, env=None, timeout=900):
    """Run a command from the repository root; fail the test with its output if it fails."""
    full_env = dict(os.environ, **(env or {}))
    p = subprocess.run(list(argv), cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p
