"""Shared fixtures: a small toy world built once per test session (tiny random Qwen2-VL and Qwen2.5-VL,
synthetic records), with the same builder `bash pipeline.sh` uses; the learning tests' world and SFT run, built
once even when `pytest -n 2` runs two workers; the order in which those workers take the test files."""
import contextlib
import fcntl
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SAMPLES = os.path.join(ROOT, "..", "shared", "samples", "viscot")
PY = sys.executable
FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5"]  # the toy models, one per common.FAMILIES entry
LEARNING_SEED = os.environ.get("LEARNING_SEED", "0")  # the learning tests' world and every run's seed
# pipeline.sh's SFT but for --min_lr_ratio (the pipeline's now decays to 0): the learning tests' bars were sized on runs
# from this one, and they test the loops, not the regime's table.
LEARNING_SFT_FLAGS = ["--finetune", "full", "--lr", "2e-3", "--min_lr_ratio", "0.1", "--warmup_ratio", "0.07",
                      "--max_steps", "1000", "--batch_size", "8", "--box_decimals", "2"]

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest -n N: the workers share the cores, each with its share of threads (torch would take them all, and
    # two such processes spin against each other), and so do the scripts the tests start (the environment is
    # inherited). Set before any test module imports torch.
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) //
                                            int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_configure(config):
    """pytest -n N: whole files to a worker (module fixtures are built once), in the order below."""
    if getattr(config.option, "numprocesses", None) and config.option.dist == "load":
        config.option.dist, config.option.loadscopereorder = "loadfile", False


# pytest -n 2 hands whole files to the workers in this order. test_learning.py builds the learning tests' SFT run
# (learning_sft below) and goes first; the two GRPO learning claims, which start from that run, come once the other
# worker has had the files up to test_eval.py (about what the SFT run takes), so it need not wait for the run; the
# short files fill in behind them, so neither worker idles at the end.
FILE_ORDER = {"test_learning.py": "", "test_learning_focus.py": "test_eval.py~1",
              "test_learning_zoom.py": "test_eval.py~2"}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: FILE_ORDER.get(item.path.name, item.path.name))


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_toy.py"), "--out", str(out),
                    "--n_train", "64", "--n_questions", "16", "--n_test", "16",
                    "--families", ",".join(FAMILIES)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def learning_sft(tmp_path_factory):
    """The learning tests' world (make_toy.py's default, LEARNING_SEED) and an SFT run on it as pipeline.sh's
    (LEARNING_SFT_FLAGS): (world, sft run directory). The default world's distractors are named shapes
    (pipeline.sh's are not): the bars of the learning tests were sized by runs on it, and they test the loops,
    not the regime. Under pytest -n the first worker to ask builds them in the session's shared directory while
    any other waits on the lock, then finds them done."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # the workers' common parent
    out = root / f"learning-{LEARNING_SEED}"
    with open(str(out) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "done").exists():
            shutil.rmtree(out, ignore_errors=True)  # a build that failed part-way
            run_script(PY, os.path.join(ROOT, "tools", "make_toy.py"), "--out", str(out / "world"), "--seed",
                       LEARNING_SEED)
            run_script(PY, os.path.join(ROOT, "sft.py"), "--model", str(out / "world" / "qwen2-vl"), "--data",
                       str(out / "world" / "data" / "train.jsonl"), "--output_dir", str(out / "sft"),
                       *LEARNING_SFT_FLAGS, "--seed", LEARNING_SEED)
            (out / "done").touch()
    return out / "world", out / "sft"


def run_script(*argv, env=None, timeout=None):
    """Run a command from the repository root; fail the test with its output if it fails. No time limit by
    default: a loaded machine is slower, not broken. `python script.py ...` without its own environment runs
    in a process forked from the fork server (torch and transformers already imported)."""
    if argv[0] == PY and str(argv[1]).endswith(".py") and env is None and timeout is None:
        p = run(*argv[1:])
        p = subprocess.CompletedProcess(list(argv), p.rc, p.stdout, p.stderr)
    else:
        full_env = dict(os.environ, **(env or {}))
        p = subprocess.run(list(argv), cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        command = " ".join(map(str, argv))
        raise AssertionError(f"{command} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


class ForkServer:
    """`python script args...` as a process forked from tests/forkrun.py, which imports torch and transformers
    once: a command starts in a fraction of a second instead of five. Started on first use."""

    def __init__(self):
        self.server, self.count, self.logs = None, itertools.count(), None

    def __call__(self, script, *args, kill_when=None):
        """.rc, .stdout, .stderr of the command; kill_when=(path, lines): SIGKILL once the file has them."""
        if self.server is None:
            self.logs = tempfile.mkdtemp(prefix="forkrun-")
            self.server = subprocess.Popen([PY, os.path.join(ROOT, "tests", "forkrun.py")], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True, cwd=ROOT)
        n = next(self.count)
        out, err = os.path.join(self.logs, f"{n}.out"), os.path.join(self.logs, f"{n}.err")
        request = {"argv": [os.path.join(ROOT, str(script)), *map(str, args)], "cwd": ROOT, "stdout": out,
                   "stderr": err, "kill_when": [str(kill_when[0]), kill_when[1]] if kill_when else None}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        reply = self.server.stdout.readline()
        assert reply, "the fork server died"
        with open(out) as f_out, open(err) as f_err:
            return types.SimpleNamespace(rc=json.loads(reply)["rc"], stdout=f_out.read(), stderr=f_err.read())

    def close(self):
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=60)
            shutil.rmtree(self.logs, ignore_errors=True)


run = ForkServer()


def pytest_sessionfinish(session, exitstatus):
    run.close()


@pytest.fixture(name="run", scope="session")
def run_fixture():
    """The fork server (ForkServer): run(script, *args, kill_when=None)."""
    return run


@contextlib.contextmanager
def chat_server(reply):
    """A local OpenAI-compatible judge: reply(request body) -> (HTTP status, message content) per POST.
    Yields the base URL."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            status, content = reply(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
