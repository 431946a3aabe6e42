"""FedBN (Li et al., ICLR 2021): which parts of a model stay on each client, and the server's
stand-in for them.

Under `--bn=local` every BatchNorm layer (its scale, its bias and its running statistics) is
the client's own: it is never uploaded, never averaged and never downloaded. Only the other
parameters travel. A BatchNorm layer is recognised as a module that holds running statistics
(`batch_stats`), so the FSM branch's BatchNorm layers are local too.

The server's global model under `local` has no trained BatchNorm of its own. It is defined as
the averaged shared layers with BatchNorm scale 1 and bias 0 (a plain normalisation, not the
zero-initialised scale some layers start from) and running statistics re-estimated on the
images the server evaluates (`estimate_batch_stats`, "precise BatchNorm"; Wu & Johnson 2021).
The clients' own evaluation (`client_evaluation`) is FedBN's measure; the server's is a
stand-in a downstream user can load.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdesens.models.resnet import BN_MOMENTUM


def _module_paths(batch_stats: Any) -> set[tuple[str, ...]]:
    """Paths of the modules that hold running statistics (each has "mean" and "var" leaves)."""
    paths = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(batch_stats)[0]:
        paths.add(tuple(p.key for p in path[:-1]))
    return paths


def local_flags(variables: dict[str, Any], bn: str) -> dict[str, Any]:
    """A tree of Python bools like `variables`: True where the leaf stays on the client."""
    if bn != "local":
        return jax.tree.map(lambda _: False, variables)
    modules = _module_paths(variables["batch_stats"])

    def params_flag(path, _):
        return tuple(p.key for p in path[:-1]) in modules

    return {"params": jax.tree_util.tree_map_with_path(params_flag, variables["params"]),
            "batch_stats": jax.tree.map(lambda _: True, variables["batch_stats"])}


def merge(shared: Any, local: Any, flags: Any) -> Any:
    """`local`'s leaves where `flags` is True, `shared`'s elsewhere (flags are static)."""
    return jax.tree.map(lambda f, s, c: c if f else s, flags, shared, local)


def shared_leaves(variables: Any, flags: Any) -> list[Any]:
    """The leaves that travel between server and clients, in tree order."""
    return [x for x, f in zip(jax.tree.leaves(variables), jax.tree.leaves(flags)) if not f]


def fill_shared(template: Any, flags: Any, leaves: list[Any]) -> Any:
    """`template` with its travelling leaves replaced by `leaves` (as `shared_leaves` lists them)."""
    values, treedef = jax.tree.flatten(template)
    incoming = iter(leaves)
    out = [v if f else next(incoming) for v, f in zip(values, jax.tree.leaves(flags))]
    return jax.tree.unflatten(treedef, out)


def server_batchnorm(variables: dict[str, Any], flags: Any) -> dict[str, Any]:
    """The server's own BatchNorm layers under `local`: scale 1, bias 0, statistics 0 and 1."""
    def plain(path, x, flag):
        if not flag:
            return x
        name = path[-1].key
        return jnp.ones_like(x) if name in ("scale", "var") else jnp.zeros_like(x)

    return jax.tree_util.tree_map_with_path(plain, variables, flags)


def estimate_batch_stats(model, variables: dict[str, Any], batches: Iterator[tuple[jax.Array, Any, int]]
                         ) -> dict[str, Any]:
    """Running statistics re-estimated on the given batches ("precise BatchNorm").

    Each batch `(images, fsm_mask, valid)` runs in training mode from zero statistics, so the
    updated statistics are `(1 - momentum) x` that batch's own; their example-weighted mean over
    the batches is the estimate (a variance is the mean of per-batch variances). Padding rows
    must not be present: pass batches of real images only.
    """
    @jax.jit
    def batch_stats(variables, images, mask):
        zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
        _, updates = model.apply({"params": variables["params"], "batch_stats": zeros}, images, mask, train=True,
                                 mutable=["batch_stats"])
        return jax.tree.map(lambda x: x / (1.0 - BN_MOMENTUM), updates["batch_stats"])

    total, weight = None, 0
    for images, mask, valid in batches:
        stats = jax.device_get(batch_stats(variables, images, mask))
        scaled = jax.tree.map(lambda x: np.asarray(x, np.float64) * valid, stats)
        total = scaled if total is None else jax.tree.map(np.add, total, scaled)
        weight += valid
    if total is None:
        raise ValueError("no images to estimate BatchNorm statistics on")
    estimate = jax.tree.map(lambda x, ref: (x / weight).astype(ref.dtype), total, variables["batch_stats"])
    return {"params": variables["params"], "batch_stats": estimate}
