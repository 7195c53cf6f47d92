"""Entry point: ``python -m jaxcf.main --config=configs/NAME.py[:variant] --workdir=DIR``.

Parses flags, joins the other processes of a multi-host run (``--distributed``, see
:mod:`jaxcf.train.distributed`), and hands the config to :func:`jaxcf.pipelines.run`, which builds
the mesh and runs the pipeline named by ``config.pipeline``. ``--config.a.b=v`` overrides any field;
``--config.mesh=data:-1,model:2`` sets the device mesh.

Exit codes: 0 done (or preempted by SIGTERM after a checkpoint: rerun to resume); 2 bad input
(flags, config, paths, data, checkpoints, a workdir in use), one line ``jaxcf: error: ...`` on
stderr; 3 the run stopped on a non-finite loss (the last good checkpoint is kept).
"""

import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/dicap.py:toy.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and results (local or gs://).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-process setup: auto (from JAXCF_COORDINATOR_ADDRESS/JAXCF_NUM_PROCESSES/JAXCF_PROCESS_ID, a SLURM "
    "step or a multi-host TPU slice; else one process), on (always call jax.distributed.initialize), off.")
_CPU_DEVICES = flags.DEFINE_string(
    "cpu_devices", "auto",
    "JAX devices the CPU backend is split into, so data parallelism fills the cores: auto (2 on a single-process "
    "run with 2+ cores, unless JAX_NUM_CPU_DEVICES or XLA_FLAGS set it; JAXCF_CPU_DEVICES overrides auto) or "
    "a positive integer. Accelerator runs are unaffected.")
_CPU_MALLOC = flags.DEFINE_string(
    "cpu_malloc", "auto",
    "Back XLA:CPU's per-step buffers with transparent huge pages (the command restarts itself once with "
    "GLIBC_TUNABLES=glibc.malloc.hugetlb=1; jaxcf.utils.cpu_malloc): auto (on a CPU-only JAX with glibc 2.35+, "
    "unless MALLOC_* / glibc.malloc settings are given; JAXCF_CPU_MALLOC overrides auto), on or off.")
_BREAK_LOCK = flags.DEFINE_bool(
    "break_lock", False, "Remove the workdir's lock (jaxcf.lock) of a run that is known to be gone, then run.")

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3


def die(message: str, code: int = EXIT_BAD_INPUT):
    """One line on stderr and exit: what is wrong and what is allowed."""
    print(f"jaxcf: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


def _last_line(text: str) -> str:
    """The message of a (possibly nested) error: the last line of a traceback, without the
    exception's module and class (``jaxcf.configs.ConfigError: unknown variant ...``)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Pass --helpshort")]
    last = lines[-1] if lines else str(text)
    return re.sub(r"^[\w.]+(Error|Exception): ", "", last)


def _load_config(config_arg: str):
    """The config of ``--config=path[:variant]``, loaded again to explain an error; None if it fails."""
    import importlib.util

    path, _, arg = config_arg.partition(":")
    try:
        spec = importlib.util.spec_from_file_location("jaxcf_config_check", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(*([arg] if arg else []))
    except Exception:  # noqa: BLE001 - the config itself is broken; reported elsewhere
        return None


def _field_type(config_arg: str, field: str) -> str:
    config = _load_config(config_arg)
    try:
        for part in field.split("."):
            config = config[part]
    except Exception:  # noqa: BLE001
        return "value"
    return type(config).__name__


def _config_path_problem(config_arg: str, override: str) -> str | None:
    """For ``--config.a.b``: which part of ``a.b`` does not exist, with the fields that do."""
    import ml_collections

    config = _load_config(config_arg)
    if config is None:
        return None
    node, seen = config, "config"
    for part in override.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)):
            return f"--config.{override}: {seen}={node!r} is a value, not a group of fields"
        if part not in node:
            fields = ", ".join(sorted(node.keys()))
            return f"--config.{override}: {seen} has no field {part!r}; its fields: {fields}"
        node, seen = node[part], f"{seen}.{part}"
    return None


def _split_mesh(argv):
    """Takes ``--config.mesh=...`` out of argv (a list field absl cannot override); parsed later."""
    rest, mesh = [], None
    it = iter(argv)
    for arg in it:
        m = re.match(r"^--?config\.mesh(=(.*))?$", arg)
        if m:
            mesh = m.group(2) if m.group(1) is not None else next(it, "")
        else:
            rest.append(arg)
    return rest, mesh


def _config_arg(argv):
    """The value of ``--config`` in argv (``--config=X`` or ``--config X``), or None."""
    for i, a in enumerate(argv):
        if re.match(r"^--?config=", a):
            return a.split("=", 1)[1]
        if re.match(r"^--?config$", a):
            return argv[i + 1] if i + 1 < len(argv) else None
    return None


def parse_flags(argv):
    """absl's flag parsing, with every problem turned into one ``jaxcf: error:`` line and exit 2."""
    argv, mesh = _split_mesh(argv)
    sys.argv[:] = argv  # ml_collections reads the overrides from sys.argv itself
    config_arg = _config_arg(argv)
    wants_help = any(re.match(r"^--?(help|helpshort|helpfull|h|\?)$", a) for a in argv)
    if config_arg is None and not wants_help:
        die("--config is required, e.g. --config=configs/dicap.py:toy (the part after ':' picks a variant)")
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        msg = _last_line(str(e))
        m = re.match(r"^flag --config\.([\w.]+)=(.*?): (.*)$", msg)
        if m:
            die(f"--config.{m.group(1)}={m.group(2)}: not a valid {_field_type(config_arg, m.group(1))} ({m.group(3)})")
        if msg.startswith("Unknown command line flag"):
            msg += "; jaxcf's flags: --config, --config.FIELD=VALUE, --workdir, --distributed, --cpu_devices, --cpu_malloc, --break_lock"
        die(msg.replace("Unknown command line flag", "unknown flag"))
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # raised by ml_collections on overrides
        for a in argv:
            m = re.match(r"^--?(?:no)?config\.([\w.]+)", a)
            problem = m and config_arg and _config_path_problem(config_arg, m.group(1))
            if problem:
                die(problem)
        die(f"bad --config override: {_last_line(str(e))}")
    if len(rest) > 1:
        die(f"unexpected arguments: {' '.join(rest[1:])} (flags are --name=value)")
    config = _CONFIG.value
    import ml_collections

    if not isinstance(config, ml_collections.ConfigDict):
        path = (config_arg or "").split(":", 1)[0]
        die(f"--config={config_arg}: cannot load the config file {path!r} ({_last_line(_config_error(config))}); "
            "give a configs/*.py file, e.g. --config=configs/dicap.py:toy")
    if mesh is not None:
        from jaxcf.configs import ConfigError, parse_mesh

        try:
            config.mesh = parse_mesh(mesh)
        except ConfigError as e:
            die(e)
    return rest


def _config_error(config) -> str:
    try:
        config.keys()
    except Exception as e:  # noqa: BLE001 - ml_collections' stand-in for a config that did not load
        return str(e)
    return "not a ConfigDict"


def main(argv):
    del argv  # checked by parse_flags
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # library INFO logs (Orbax) drown the progress bar
    from jaxcf.utils import cpu_malloc

    try:  # first: may restart this command (exec) with the tunable, before JAX starts any thread
        cpu_malloc.ensure(_CPU_MALLOC.value) if _ENTRY else cpu_malloc.plan(_CPU_MALLOC.value)
    except cpu_malloc.CpuMallocError as e:
        die(e)
    from jaxcf.utils import compile_cache

    compile_cache.enable()  # before the first compilation; JAXCF_COMPILATION_CACHE=off disables it
    from jaxcf.train import distributed

    try:  # before anything touches a device
        multi = distributed.initialize(_DISTRIBUTED.value)
    except distributed.DistributedError as e:
        die(e)
    from jaxcf.train import cpu_devices

    try:  # also before any backend exists
        cpu_devices.apply(_CPU_DEVICES.value, multi_process=multi is not None)
    except cpu_devices.CpuDevicesError as e:
        die(e)
    if multi is not None:
        print(f"jaxcf: {distributed.describe()}", file=sys.stderr)

    from jaxcf.configs import ConfigError
    from jaxcf.data.tfds_data import DatasetNotPreparedError
    from jaxcf.models.loading import CheckpointError
    from jaxcf.pipelines import run
    from jaxcf.train.loop import NonFiniteLoss, Preempted
    from jaxcf.utils.lock import LockError

    try:
        run(_CONFIG.value, _WORKDIR.value, break_lock=_BREAK_LOCK.value)
    except (ConfigError, CheckpointError, DatasetNotPreparedError, LockError) as e:
        die(e)
    except NonFiniteLoss as e:
        die(e, EXIT_NONFINITE)
    except Preempted as e:
        logging.warning("%s", e)
        print(f"jaxcf: {e}; rerun the same command to resume", file=sys.stderr)
        sys.exit(0)


_ENTRY = False  # True when this process was started as the command line (cli), not main() called in-process


def cli():
    global _ENTRY
    _ENTRY = True
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
