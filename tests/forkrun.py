"""Run stage scripts as separate processes without paying Python's start-up (torch, transformers: ~5 s) for
each: this server imports them once, then forks one child per request, and the child runs the script as
`python script.py args...` would: its own process, argv, working directory, stdout and stderr (files), exit
status, and a traceback printed on an uncaught exception. The server itself never runs a torch operation,
so no thread pool exists when it forks.

Protocol: one JSON object per line on stdin, {"argv": [script, args...], "cwd", "stdout", "stderr", "env",
"kill_when": [path, lines] or null}; one line back on stdout, {"rc": exit status, or -9 when killed}. With
kill_when, the child is killed with SIGKILL as soon as that path exists and holds at least `lines` complete
lines (a fault injected mid-run).
"""
import atexit
import json
import os
import runpy
import signal
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402,F401 - imported once here, reused by every child
import peft  # noqa: E402,F401
import transformers  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402,F401 - resolves the lazy imports


def run_child(req):
    """In the forked child: become `python argv...` and exit as it would."""
    os.chdir(req["cwd"])
    os.environ.update(req.get("env") or {})
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = list(req["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:  # as the interpreter does: None -> 0, an int as is, anything else printed, 1
        if isinstance(e.code, int):
            code = e.code
        elif e.code is not None:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException as e:  # noqa: BLE001 - an uncaught exception: the traceback the user would see,
        tb = e.__traceback__     # from the script's own frame on (not this runner's and runpy's)
        while tb is not None and tb.tb_frame.f_code.co_filename != sys.argv[0]:
            tb = tb.tb_next
        traceback.print_exception(type(e), e, tb or e.__traceback__)
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def reached(path, lines):
    if not os.path.exists(path):
        return False
    if lines == 0:
        return True
    with open(path, "rb") as f:
        return f.read().count(b"\n") >= lines


def main():
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            run_child(req)
        kill_when = req.get("kill_when")
        while kill_when:  # poll until the child ends (break) or the fault is due (then the else: wait for it)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if reached(*kill_when):
                os.kill(pid, signal.SIGKILL)
                kill_when = None
            time.sleep(0.02)
        else:
            _, status = os.waitpid(pid, 0)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"rc": rc}), flush=True)


if __name__ == "__main__":
    main()
