"""What every benchmark script shares: timing implementations side by side, writing JSON."""

import json
import os
import time

import numpy as np

# PyTorch's OpenMP workers spin for a while after each parallel region, and a pool that has gone
# to sleep takes a while to wake: a short function timed right after another implementation's
# call measures that hand-over. Short functions are therefore timed as a block of calls after one
# untimed call; long ones (a DDIM run) one call at a time, where the hand-over is noise.
BLOCK_SECONDS = 0.2
LONG_SECONDS = 0.5


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each zero-argument function, after two warm-up calls
    (compilation, and an executable's one-time set-up). Repeats alternate between the functions,
    so load that comes and goes hits all of them; a function under LONG_SECONDS is timed as the
    mean over a block of about BLOCK_SECONDS of calls that follows one untimed call."""
    calls = {}  # calls per timed block; None for a long function (one call, no hand-over)
    for k, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        calls[k] = None if dt >= LONG_SECONDS else int(np.ceil(BLOCK_SECONDS / max(dt, 1e-6)))
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if calls[k] is not None:  # the hand-over call
                fn()
            n = calls[k] or 1
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[k].append((time.perf_counter() - t0) / n)
    return {k: float(np.median(v)) for k, v in times.items()}


def write_json(path: str, results) -> None:
    """results as indented JSON at ``path`` (its folder made if needed); says where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")


def dicap_toy(workdir: str):
    """(config, mesh, foundation) of configs/dicap.py:toy: a mesh over every device and the toy
    foundation, read from the shipped weights or trained in ``workdir`` when the config differs."""
    from jaxcf.configs import config_file
    from jaxcf.foundation import build_foundation
    from jaxcf.train import make_mesh

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = config_file(os.path.join(root, "configs", "dicap.py"), "toy")
    mesh = make_mesh()
    return config, mesh, build_foundation(config, workdir, mesh)
