"""One device mesh for the whole program, batch sharding, and multi-host start-up.

Data parallelism is expressed the modern way: a 1-D `Mesh` over every device, parameters
replicated (`P()`), batches split along the `data` axis (`P('data')`), and `jax.jit` inserts the
collectives. BatchNorm statistics are therefore computed over the global batch, so any device
count computes the same function as one device.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def maybe_initialize_distributed() -> bool:
    """Joins a multi-host job when its coordinator is configured in the environment.

    Set `JAX_COORDINATOR_ADDRESS=host:port`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (or run
    under a cluster JAX auto-detects, such as SLURM, with `JAX_COORDINATOR_ADDRESS` set).
    """
    if not any(os.environ.get(name) for name in _DISTRIBUTED_ENV) or jax.distributed.is_initialized():
        return False
    kwargs: dict[str, Any] = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(coordinator_address=os.environ.get("JAX_COORDINATOR_ADDRESS"), **kwargs)
    return True


def make_mesh(devices: list | None = None) -> Mesh:
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    """This process's share of a global batch; the batch must split evenly over devices."""
    if global_batch % mesh.size:
        raise ValueError(f"--batch_size={global_batch} must be a multiple of the device count {mesh.size}")
    return global_batch // jax.process_count()


def put_batch(batch: Any, mesh: Mesh) -> Any:
    """Assembles process-local host arrays into global arrays sharded along the batch axis."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))
