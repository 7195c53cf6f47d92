"""Runs ``python -m jaxcf.main ARGV`` for many argvs in one warm interpreter (used by test_cli_errors).

Reads a JSON list of argv lists on stdin; for each, forks, and the child runs the module exactly as
``python -m jaxcf.main`` does (``runpy.run_module("jaxcf.main", run_name="__main__")``: a fresh
jaxcf.main with fresh flags, the same ``app.run``), with stderr captured in a file. Only the
interpreter start and the imports of jax and the pipelines are shared, done once here, which
turns ~2 s per case into ~0.1 s. Writes a JSON list of {"rc", "stderr", "seconds"} on stdout.
"""

import json
import os
import runpy
import sys
import tempfile
import time
import traceback


def run_one(argv, err_path):
    pid = os.fork()
    if pid == 0:  # the child: one `python -m jaxcf.main` run
        code = 1
        try:
            fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.argv = ["jaxcf.main", *argv]
            runpy.run_module("jaxcf.main", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - a traceback is what the test must see
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main():
    cases = json.load(sys.stdin)
    # what every run imports anyway, imported once (no devices are touched: the children make them)
    import jax  # noqa: F401

    import jaxcf.pipelines.dicap  # noqa: F401
    import jaxcf.pipelines.didae  # noqa: F401
    import jaxcf.pipelines.diffusion  # noqa: F401

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        err_path = os.path.join(tmp, "stderr")
        for argv in cases:
            sys.stdout.flush()
            sys.stderr.flush()
            t0 = time.time()
            rc = run_one(argv, err_path)
            with open(err_path) as f:
                out.append({"rc": rc, "stderr": f.read(), "seconds": round(time.time() - t0, 2)})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
