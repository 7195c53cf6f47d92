"""Pipelines by config name: ``config.pipeline`` picks the ``run(config, workdir, mesh)`` to call."""

from __future__ import annotations

import importlib
import os

from jaxcf.configs import ConfigError, validate_common
from jaxcf.utils import io

# name -> "module:function"; each module also has validate(config), called before any work.
PIPELINES = {
    "diffusion": "jaxcf.pipelines.diffusion",
    "dicap": "jaxcf.pipelines.dicap",
    "didae": "jaxcf.pipelines.didae",
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


def run(config, workdir: str):
    """Validates everything, builds the mesh, and runs the pipeline named by ``config.pipeline``."""
    from jaxcf.train.mesh import make_mesh

    workdir = check_workdir(workdir)
    validate_common(config)
    pipeline = get_pipeline(config.pipeline)
    pipeline.validate(config)
    try:
        mesh = make_mesh(config.mesh)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    write_config(config, workdir)
    return pipeline.run(config, workdir, mesh)


def write_config(config, workdir: str) -> None:
    """``workdir/config.json`` (local or ``gs://``), written by process 0: what the run was asked to do."""
    if io.is_writer():
        io.write_text(io.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
