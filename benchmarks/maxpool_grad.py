"""The stem max-pool's forward + backward: the project's custom gradient (`models/pooling.py`)
against `jax.grad` of Flax's `nn.max_pool`, on the stem's output map, in images/s.

    python benchmarks/maxpool_grad.py --image_size 112 --batch 256 --bf16 --json out.json

On the CPU the custom gradient replaced a 60-88 ms iota/scatter expansion per training step
(ResNet-18, 64 px, batch 64); `gpu_suite.sh` runs this to check it does not cost time on a GPU.
"""

from __future__ import annotations

import common  # noqa: F401  (puts the repository on sys.path)
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdesens.models.pooling import max_pool


def _flax_pool(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))


def main() -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--image_size", type=int, default=112, help="network input; the pool sees half of it")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--channels", type=int, default=64, help="stem channels")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.batch, args.channels, args.windows, args.iters = 32, 4, 8, 2, 2
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    side = args.image_size // 2
    x = jnp.asarray(np.random.default_rng(0).random((args.batch, side, side, args.channels)), dtype)
    rows, rates = [], {}
    for name, pool in (("custom", max_pool), ("flax", _flax_pool)):
        grad = jax.jit(jax.grad(lambda v, pool=pool: jnp.sum(pool(v).astype(jnp.float32) ** 2)))
        r = common.time_it(lambda: grad(x).block_until_ready(), args.batch, windows=args.windows, iters=args.iters)
        rates[name] = r["per_s"]
        rows.append({"name": f"maxpool_grad_{name}", "value": r["per_s"], "unit": "images/s",
                     "notes": f"forward + backward on {args.batch}x{side}x{side}x{args.channels}, "
                              f"{jnp.dtype(dtype).name}", **r})
    rows.append({"name": "maxpool_grad_speedup", "value": rates["custom"] / rates["flax"], "unit": "x",
                 "notes": "custom gradient over jax.grad of nn.max_pool"})
    common.finish("maxpool_grad", vars(args) | {"json": str(args.json)}, rows, args.json)


if __name__ == "__main__":
    main()
