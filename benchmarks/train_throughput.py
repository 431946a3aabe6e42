"""Train-step throughput (images/s) for `resnet`, `mask` and `fsm`, and the FSM overhead; plus
embedding extraction (images/s) as used by evaluation.

    python benchmarks/train_throughput.py --depth 34 --image_size 112 --batch 256 --bf16 --json out.json

Batches are pre-placed on the devices (the input pipeline has its own benchmark); the step is
the library's jitted, data-parallel `train_step` over every local device.
"""

from __future__ import annotations

import common  # noqa: F401
import jax
import jax.numpy as jnp
import numpy as np

from jaxdesens import parallel
from jaxdesens.config import TrainConfig
from jaxdesens.masks.levels import make_level_bank
from jaxdesens.recognizer import _embed_fn
from jaxdesens.state import build_model, create_train_state
from jaxdesens.train import MaskSource, compile_train_step


def main() -> None:
    parser = common.base_parser(__doc__)
    common.add_model_flags(parser)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--embed_batch", type=int, default=512)
    parser.add_argument("--fsm_after", type=int, default=3)
    parser.add_argument("--models", default="resnet,mask,fsm")
    args = parser.parse_args()
    if args.quick:
        common.quick_model(args)
        args.batch, args.embed_batch = 8, 8
    size = args.image_size
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    batch = parallel.put_batch({"image": rng.integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8),
                                "label": rng.integers(0, args.classes, args.batch).astype(np.int32)}, mesh)
    fixed = np.ones((size, size), np.float32)
    fixed[size // 2:, :] = 0  # a fixed mask hiding the lower half (the FSM use case: one searched mask)
    bank = make_level_bank(jax.random.key(0), size, size, 16)
    rows, rates = [], {}
    for mode in args.models.split(","):
        config = TrainConfig(model=mode, depth=args.depth, width=args.width, image_size=size, batch_size=args.batch,
                             bf16=args.bf16, fsm_after=args.fsm_after, steps=1000)
        model = build_model(config, args.classes)
        state = parallel.put_replicated(create_train_state(config, model, jax.random.key(0), (size, size, 3)), mesh)
        masks = parallel.put_replicated({"resnet": MaskSource(), "mask": MaskSource(bank=jnp.asarray(bank)),
                                         "fsm": MaskSource(fixed=jnp.asarray(fixed))}[mode], mesh)
        key = parallel.put_replicated(jax.random.key(1), mesh)
        step = compile_train_step(config, mesh, use_fsm=mode == "fsm")
        holder = [state]

        def run():
            holder[0], metrics = step(holder[0], batch, masks, key)
            metrics["loss"].block_until_ready()

        r = common.time_it(run, args.batch, windows=args.windows, iters=args.iters)
        rates[mode] = r["per_s"]
        notes = {"resnet": "clean", "mask": "random level masks per image",
                 "fsm": f"fixed mask, FSM after layer{args.fsm_after}"}[mode]
        rows.append({"name": f"train_step_{mode}", "value": r["per_s"], "unit": "images/s",
                     "notes": f"{notes}, batch {args.batch}", **r})
        if mode == "resnet":
            variables = {"params": holder[0].params, "batch_stats": holder[0].batch_stats}
            embed = _embed_fn(model, False)
            images = jnp.asarray(rng.integers(0, 256, (args.embed_batch, size, size, 3), dtype=np.uint8))
            r = common.time_it(lambda: embed(variables, images, None).block_until_ready(), args.embed_batch,
                               windows=args.windows, iters=args.iters)
            rows.append({"name": "embedding", "value": r["per_s"], "unit": "images/s",
                         "notes": f"Flax apply, eval mode, batch {args.embed_batch}", **r})
    if "fsm" in rates and "resnet" in rates:
        overhead = rates["resnet"] / rates["fsm"] - 1
        rows.append({"name": "fsm_overhead", "value": 100 * overhead, "unit": "%",
                     "notes": "fsm step time over resnet step time, minus 1"})
    common.finish("train_throughput", vars(args) | {"json": str(args.json), "bf16": args.bf16}, rows, args.json)


if __name__ == "__main__":
    main()
