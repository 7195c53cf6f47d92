"""The persistent compilation cache: a second process loads what the first compiled."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import json
from jaxcf.utils import compile_cache
path = compile_cache.enable()
import jax, jax.numpy as jnp
import numpy as np

def f(x):  # an unrolled chain: compiles for well over compile_cache.MIN_COMPILE_SECONDS
    for i in range(60):
        x = jnp.sin(x) @ x + i
    return x

jax.jit(f)(np.ones((8, 8), np.float32)).block_until_ready()  # numpy input: f is the only program
print(json.dumps(dict(compile_cache.timings(), path=path)))
"""


def _probe(env):
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_hits_the_cache(tmp_path):
    env = dict(os.environ, JAXCF_COMPILATION_CACHE=str(tmp_path / "xla"))
    first, second = _probe(env), _probe(env)
    assert first["path"] == str(tmp_path / "xla")
    assert first["cache_misses"] >= 1 and first["cache_hits"] == 0
    assert second["cache_hits"] >= 1 and second["cache_misses"] == 0
    assert os.listdir(tmp_path / "xla")
    assert second["compile_seconds"] < first["compile_seconds"]


def test_off_disables_it(tmp_path):
    env = dict(os.environ, JAXCF_COMPILATION_CACHE="off")
    out = _probe(env)
    assert out["path"] is None and out["cache_hits"] == 0 and out["cache_misses"] == 0
    assert out["compilation_cache"] == "off"
