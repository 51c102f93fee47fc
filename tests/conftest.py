"""Shared fixtures: a small toy world built once per test session (tiny random Qwen2-VL and Qwen2.5-VL,
synthetic records), with the same builder `bash pipeline.sh` uses."""
import contextlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SAMPLES = os.path.join(ROOT, "..", "shared", "samples", "viscot")


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_toy.py"), "--out", str(out),
                    "--n_train", "64", "--n_questions", "16", "--n_test", "16"], check=True, capture_output=True)
    return out


def run_script(*argv, env=None, timeout=None):
    """Run a command from the repository root; fail the test with its output if it fails. No time limit by
    default: a loaded machine is slower, not broken."""
    full_env = dict(os.environ, **(env or {}))
    p = subprocess.run(list(argv), cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


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
