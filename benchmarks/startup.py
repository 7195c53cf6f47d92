"""Seconds from launch to a pipeline's first logged prompt-training step: a first run with empty
caches, then the same command again in a fresh workdir (the workdir deleted in between).

The second run reuses the persistent XLA compilation cache (jaxcf.utils.compile_cache) and the
user cache of counterfactuals (jaxcf.utils.user_cache); both live in a fresh folder under --root,
so the first run is cold whatever ran on this machine before. Each run is stopped at its first
logged step (the first line of any ``prompts/*/metrics.jsonl`` in its workdir).

  python benchmarks/startup.py --config=configs/dicap.py:toy --out=benchmarks/results/startup_cpu.json
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import time

from common import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_step_seconds(config: str, workdir: str, env: dict, log: str, timeout: float) -> float:
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "jaxcf.main", f"--config={config}", f"--workdir={workdir}"],
                             env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            while p.poll() is None and time.time() - t0 < timeout:
                if glob.glob(os.path.join(workdir, "prompts", "*", "metrics.jsonl")):
                    return time.time() - t0
                time.sleep(0.2)
        finally:
            p.kill()
            p.wait()
    raise RuntimeError(f"no prompt-training step logged (exit code {p.returncode}); see {log}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/dicap.py:toy")
    ap.add_argument("--root", default="/tmp/jaxcf_startup_bench", help="caches and workdir (emptied first)")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--out", default="benchmarks/results/startup_cpu.json")
    args = ap.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    os.makedirs(args.root)
    env = dict(os.environ, JAXCF_COMPILATION_CACHE=os.path.join(args.root, "xla"),
               JAXCF_CACHE=os.path.join(args.root, "cache"))
    rows = []
    for i, name in enumerate(("first (cold caches)", "second (warm caches, fresh workdir)")):
        workdir = os.path.join(args.root, "workdir")
        shutil.rmtree(workdir, ignore_errors=True)
        s = first_step_seconds(args.config, workdir, env, os.path.join(args.root, f"log_{i}.txt"), args.timeout)
        rows.append({"run": name, "seconds_to_first_logged_step": round(s, 1), "load_average_1min": os.getloadavg()[0]})
        print(f"{name:40s} {s:7.1f} s   (load {rows[-1]['load_average_1min']:.1f})", flush=True)
    ratio = rows[0]["seconds_to_first_logged_step"] / rows[1]["seconds_to_first_logged_step"]
    print(f"second run starts {ratio:.2f}x sooner")
    write_json(args.out, {"config": args.config, "runs": rows, "speedup": round(ratio, 2)})


if __name__ == "__main__":
    main()
