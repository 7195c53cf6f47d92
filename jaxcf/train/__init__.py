"""Training infrastructure: mesh and shardings, the train state and update step, checkpoints, loop."""

from jaxcf.train.checkpoint import Checkpointer
from jaxcf.train.loop import NonFiniteLoss, Preempted, stream_indices, train_loop, tree_digest
from jaxcf.train.mesh import (
    cast_floating,
    check_batch_divisible,
    data_sharding,
    make_mesh,
    param_shardings,
    replicated,
    shard_batch,
    to_host,
)
from jaxcf.train.metrics import MetricWriter, read_metrics
from jaxcf.train.state import (
    TrainState,
    create_train_state,
    jit_update,
    make_update_fn,
    per_shard_value_and_grad,
    warmup_cosine,
)

__all__ = [
    "Checkpointer", "MetricWriter", "NonFiniteLoss", "Preempted", "TrainState", "cast_floating", "check_batch_divisible",
    "create_train_state", "data_sharding", "jit_update", "make_mesh", "make_update_fn", "param_shardings", "per_shard_value_and_grad",
    "read_metrics", "replicated", "shard_batch", "stream_indices", "to_host", "train_loop", "tree_digest", "warmup_cosine",
]
