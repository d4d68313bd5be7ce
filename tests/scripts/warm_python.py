"""Runs Python scripts as `python SCRIPT` would, each in a fresh process forked from one that has
already imported trainer_lib (torch, transformers, accelerate): the tests that run many short
scripts pay those imports once instead of once a script.

Reads one JSON request a line on stdin, {"script", "cwd", "env", "timeout", "stdout", "stderr"},
and answers each with one JSON line on stdout, {"returncode"}; the script's output goes to the two
files named. The child starts its own session, changes to `cwd`, adds `env` to its environment,
puts the script's folder first on sys.path and runs the script as __main__; at its end it runs
the exit handlers a normal interpreter exit runs. A script that outlives `timeout` is killed with
its process group (returncode -9).
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import signal
import sys
import time
import traceback


def _child(request: dict) -> int:
    os.setsid()
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.chdir(request["cwd"])
    os.environ.update(request["env"])
    script = os.path.abspath(request["script"])
    sys.argv = [script]
    sys.path.insert(0, os.path.dirname(script))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:  # sys.exit(None | int | message), as the interpreter reads it
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # what the interpreter prints for an uncaught exception, and exit 1
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return -9
        time.sleep(0.05)


def main() -> None:
    import transformers.models.llama.modeling_llama  # noqa: F401  (the tiny model's class)

    import trainer_lib  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(request)
            finally:
                os._exit(code)
        print(json.dumps({"returncode": _wait(pid, request["timeout"])}), flush=True)


if __name__ == "__main__":
    main()
