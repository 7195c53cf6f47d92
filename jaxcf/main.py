"""Entry point: ``python -m jaxcf.main --config=configs/NAME.py[:variant] --workdir=DIR``.

Parses flags, and hands the config to :func:`jaxcf.pipelines.run`, which builds the mesh and
runs the pipeline named by ``config.pipeline``. ``--config.a.b=v`` overrides any field.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/dicap.py:toy.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and results (local or gs://).")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # library INFO logs (Orbax) drown the progress bar
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
