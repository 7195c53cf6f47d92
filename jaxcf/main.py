"""Entry point: ``python -m jaxcf.main --config=configs/NAME.py[:variant] --workdir=DIR``.

Parses flags, joins the other processes of a multi-host run (``--distributed``, see
:mod:`jaxcf.train.distributed`), and hands the config to :func:`jaxcf.pipelines.run`, which builds
the mesh and runs the pipeline named by ``config.pipeline``. ``--config.a.b=v`` overrides any field.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/dicap.py:toy.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and results (local or gs://).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-process setup: auto (from JAXCF_COORDINATOR_ADDRESS/JAXCF_NUM_PROCESSES/JAXCF_PROCESS_ID, a SLURM "
    "step or a multi-host TPU slice; else one process), on (always call jax.distributed.initialize), off.")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # library INFO logs (Orbax) drown the progress bar
    from jaxcf.train import distributed

    try:  # before anything touches a device
        multi = distributed.initialize(_DISTRIBUTED.value)
    except distributed.DistributedError as e:
        print(f"jaxcf: error: {e}", file=sys.stderr)
        sys.exit(2)
    if multi is not None:
        print(f"jaxcf: {distributed.describe()}", file=sys.stderr)

    from jaxcf.configs import ConfigError
    from jaxcf.models.loading import CheckpointError
    from jaxcf.pipelines import run
    from jaxcf.train.loop import Preempted

    try:
        run(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, CheckpointError) as e:
        print(f"jaxcf: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:
        logging.warning("%s", e)
        print(f"jaxcf: {e}; rerun the same command to resume", file=sys.stderr)
        sys.exit(0)


if __name__ == "__main__":
    app.run(main)
