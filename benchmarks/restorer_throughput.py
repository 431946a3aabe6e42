"""Learned restoration attacker: training-step and restoration throughput (images/s).

    python benchmarks/restorer_throughput.py [--preset cpu|gpu] --json out.json

The step is the library's jitted `train_step` (batch, flips and masks sampled on the device from
a resident image set and mask bank, as in training); restoration is `Restorer.restore`'s jitted
network call with the composite.
"""

from __future__ import annotations

import dataclasses

import common  # noqa: F401
import jax
import jax.numpy as jnp
import numpy as np

from jaxdesens.privacy.restorer_train import PRESETS, RestorerConfig, _restore_fn, build_net, compile_step, create_state


def main() -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--restore_batch", type=int, default=64)
    args = parser.parse_args()
    config = RestorerConfig(**PRESETS[args.preset])
    if args.quick:
        config = dataclasses.replace(config, image_size=32, width=4, batch_size=4, bf16=False)
        args.windows, args.iters, args.restore_batch = 2, 1, 4
    size = config.image_size
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (256, size, size, config.channels), dtype=np.uint8))
    bank = jnp.asarray(rng.integers(0, 2, (64, size, size), dtype=np.uint8))
    offsets, sizes = jnp.asarray([0, 32], jnp.int32), jnp.asarray([32, 32], jnp.int32)
    net = build_net(config)
    holder = [create_state(config, net, jax.random.key(0))]
    step = compile_step(config)
    key = jax.random.key(1)

    def train():
        holder[0], metrics = step(holder[0], images, bank, offsets, sizes, key)
        metrics["loss"].block_until_ready()

    rows = []
    r = common.time_it(train, config.batch_size, windows=args.windows, iters=args.iters)
    rows.append({"name": "restorer_train_step", "value": r["per_s"], "unit": "images/s",
                 "notes": f"{size} px, width {config.width}, batch {config.batch_size}"
                          f"{', bf16' if config.bf16 else ''}", **r})
    restore = _restore_fn(net)
    batch = jnp.asarray(rng.uniform(size=(args.restore_batch, size, size, config.channels)), jnp.float32)
    mask = jnp.asarray(rng.integers(0, 2, (args.restore_batch, size, size, 1)), jnp.float32)
    r = common.time_it(lambda: restore(holder[0].params, batch, mask).block_until_ready(), args.restore_batch,
                       windows=args.windows, iters=args.iters)
    rows.append({"name": "restorer_inference", "value": r["per_s"], "unit": "images/s",
                 "notes": f"batch {args.restore_batch}, composited", **r})
    common.finish("restorer_throughput", vars(args) | {"json": str(args.json), "config": dataclasses.asdict(config)},
                  rows, args.json)


if __name__ == "__main__":
    main()
