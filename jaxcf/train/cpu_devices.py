"""One CPU process as several JAX devices, so that data parallelism fills the cores.

XLA:CPU runs one program with the cores as an intra-op thread pool, and many of a training
step's operations (small convolutions, the kernel gradients' long contractions, the optimizer's
elementwise updates) keep only one core busy. Splitting the host into N JAX devices
(``jax_num_cpu_devices``) makes the ordinary data-parallel mesh run N programs side by side, each
on 1/N of the batch. Measured on a 2-core CPU (``python benchmarks/train.py``, README Speed): two
devices make the training steps of the toy UNet and the DiffAE decoder 1.4x faster and the
results agree to float rounding (the gradient is summed in another order); four devices on two
cores were slower.

``auto`` (the default of ``python -m jaxcf.main --cpu_devices``) therefore asks for
min(2, usable cores) devices, in a single-process run, and only when the user has not chosen
(``JAX_NUM_CPU_DEVICES`` or ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``). The
setting only shapes the CPU backend: on a GPU or TPU host the mesh is built over the accelerator
devices as before. It must be applied before JAX initialises a backend.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

from absl import logging

ENV = "JAXCF_CPU_DEVICES"
AUTO_MAX = 2  # the device count measured to help on a 2-core CPU; larger hosts: pass a number


class CpuDevicesError(ValueError):
    """A malformed ``--cpu_devices`` / JAXCF_CPU_DEVICES value; the message names it."""


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def user_chose(environ: Mapping[str, str]) -> bool:
    """True when the environment already sets the CPU device count (JAX's own ways)."""
    return bool(environ.get("JAX_NUM_CPU_DEVICES", "").strip()) or \
        "xla_force_host_platform_device_count" in environ.get("XLA_FLAGS", "")


def plan(value: str = "auto", *, multi_process: bool = False, environ: Optional[Mapping[str, str]] = None,
         cores: Optional[int] = None) -> Optional[int]:
    """How many CPU devices to ask JAX for; None leaves JAX's default (one, or the user's setting).

    ``value``: "auto" or a positive integer (``--cpu_devices``; JAXCF_CPU_DEVICES when the flag is
    "auto"). A pure function of its arguments, so it is tested without starting a backend.
    """
    env = os.environ if environ is None else environ
    source = "--cpu_devices"
    if str(value).strip() == "auto" and env.get(ENV, "").strip():
        value, source = env[ENV].strip(), ENV
    text = str(value).strip()
    if text == "auto":
        if multi_process or user_chose(env):
            return None
        n = min(AUTO_MAX, usable_cores() if cores is None else cores)
        return n if n > 1 else None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise CpuDevicesError(f"{source}={value!r} is not allowed; allowed: auto or a positive integer "
                              "(the number of JAX devices this process's CPU backend is split into)")
    return n


def apply(value: str = "auto", *, multi_process: bool = False) -> Optional[int]:
    """Sets ``jax_num_cpu_devices`` as :func:`plan` says (before any backend exists); returns it."""
    n = plan(value, multi_process=multi_process)
    if n is not None:
        import jax

        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError as e:  # a backend already exists (JAX used before, e.g. in a notebook)
            if str(value).strip() != "auto":
                raise CpuDevicesError(f"--cpu_devices={value}: JAX has already started its backends in this "
                                      "process; set it before any JAX operation") from e
            logging.warning("cpu_devices=auto: JAX's backends already exist in this process; keeping %d CPU "
                            "device(s)", jax.local_device_count("cpu"))
            return None
    return n
