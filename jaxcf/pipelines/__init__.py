"""Pipelines by config name: ``config.pipeline`` picks the ``run(config, workdir, mesh)`` to call."""

from __future__ import annotations

import importlib
import os

from jaxcf.configs import ConfigError, get, validate_common
from jaxcf.utils import io

# name -> "module:function"; each module also has validate(config), called before any work.
PIPELINES = {
    "diffusion": "jaxcf.pipelines.diffusion",
    "dicap": "jaxcf.pipelines.dicap",
    "didae": "jaxcf.pipelines.didae",
    "retrieval": "jaxcf.pipelines.retrieval",
    "vqa": "jaxcf.pipelines.vqa",
}


def get_pipeline(name: str):
    if name not in PIPELINES:
        raise ConfigError(f"config.pipeline={name!r} is unknown; allowed: {', '.join(PIPELINES)}")
    return importlib.import_module(PIPELINES[name])


def check_workdir(workdir: str | None) -> str:
    if not workdir:
        raise ConfigError("--workdir is required: the folder for checkpoints, metrics and results")
    if "://" in workdir:
        return workdir
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir} is a file; give a folder (it is created if missing)")
    return workdir


def run(config, workdir: str, break_lock: bool = False):
    """Validates everything, builds the mesh, and runs the pipeline named by ``config.pipeline``.

    The workdir is locked for the run (:class:`jaxcf.utils.lock.WorkdirLock`, process 0): a second
    run on it stops with :class:`~jaxcf.utils.lock.LockError`; ``break_lock`` removes a lock first.
    """
    from jaxcf.train.mesh import make_mesh

    workdir = check_workdir(workdir)
    validate_common(config)
    pipeline = get_pipeline(config.pipeline)
    pipeline.validate(config)
    try:
        mesh = make_mesh(config.mesh)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    check_sharded_batches(config, mesh)
    from jaxcf.utils import compile_cache

    with _workdir_lock(workdir, break_lock):
        write_config(config, workdir)
        compile_cache.start()  # results.json's "timing": compile vs run seconds of this run
        return pipeline.run(config, workdir, mesh)


# the batch fields that every pipeline having them splits over the mesh's data axis (fit, the
# counterfactual generation); a foundation field matters when that model is trained, which changing it causes
SHARDED_BATCHES = ("train.batch_size", "counterfactual.batch_size", "foundation.clip_train.batch_size",
                   "foundation.unet_train.batch_size", "foundation.noise_classifier.batch_size",
                   "encoder.batch_size", "student.batch_size", "oracle.batch_size", "cfkd.batch_size",
                   "decoder.train.batch_size")


def check_sharded_batches(config, mesh) -> None:
    """Each field of SHARDED_BATCHES the config has must divide by the data axis (and the process
    count): checked before any work, so an odd batch on a CPU split into devices
    (:mod:`jaxcf.train.cpu_devices`) fails in a second, not after minutes of counterfactuals."""
    from jaxcf.train.mesh import check_batch_divisible

    for field in SHARDED_BATCHES:
        try:
            value = get(config, field)
        except ConfigError:  # this pipeline has no such field
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            check_batch_divisible(value, mesh, f"config.{field}")


def _workdir_lock(workdir: str, break_lock: bool):
    import contextlib

    from jaxcf.utils.lock import WorkdirLock

    return WorkdirLock(workdir, break_lock) if io.is_writer() else contextlib.nullcontext()


def write_config(config, workdir: str) -> None:
    """``workdir/config.json`` (local or ``gs://``), written by process 0: what the run was asked to do."""
    if io.is_writer():
        io.write_text(io.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
