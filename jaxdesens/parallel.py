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
    under a cluster JAX auto-detects, such as SLURM, with `JAX_COORDINATOR_ADDRESS` set). On CPU
    the processes' collectives run over TCP with gloo (`jax_cpu_collectives_implementation`, the
    default since JAX 0.10; set here for older versions, whose default had none).
    """
    if not any(os.environ.get(name) for name in _DISTRIBUTED_ENV) or jax.distributed.is_initialized():
        return False
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
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
    """Each process's share of a global batch (the data pipeline yields rows
    [process_index x share, ...)) assembled into global arrays sharded along the batch axis."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """`tree` (the same values in every process) copied to every device of the mesh. Across
    processes `device_put` cannot reach the other hosts' devices: each process places its own."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def to_host_local(tree: Any) -> Any:
    """Replicated global arrays as this process's own copy (on its first device), for the
    single-process code that follows training (evaluation, export); unchanged on one process."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)
