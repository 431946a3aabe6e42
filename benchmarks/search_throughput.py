"""Throughput of the search stages: candidate scoring (masks/s), candidate generation (masks/s),
EBP saliency (maps/s) against plain forward inference (images/s), and occlusion saliency (maps/s:
one map is a forward per patch position).

    python benchmarks/search_throughput.py --depth 34 --image_size 112 --batch_images 32 \
        --chunk 256 --bf16 --json out.json

Uses a randomly initialised ResNet (throughput does not depend on the weights' values).
"""

from __future__ import annotations

import common  # noqa: F401  (puts the repository on sys.path)
import jax
import jax.numpy as jnp

from jaxdesens import parallel
from jaxdesens.jobs.search import IMAGES_PER_IDENTITY
from jaxdesens.masks.freeform import StrokeRanges
from jaxdesens.models import ResNet, conv
from jaxdesens.models.functional import fold_batchnorm, forward
from jaxdesens.saliency.ebp import saliency_maps
from jaxdesens.saliency.occlusion import default_patch, occlusion_maps, patch_masks
from jaxdesens.search import make_candidates, score_masks, scoring_targets

STAGES = ("scoring", "generation", "ebp", "occlusion")  # ebp includes the plain forward it is compared with


def scoring_rows(args, folded, images, labels, template, ranges, key) -> list[dict]:
    """Masks/s of `score_masks`, its masks split over every local device as `search_mask` does."""
    rows = []
    dtype_name = jnp.dtype(folded["stem"]["w"].dtype).name
    mesh = parallel.make_mesh(jax.local_devices())
    gamma, floor = jnp.float32(1.0), jnp.float32(0.0)
    targets = scoring_targets(labels, args.objective)
    folded, images, targets, gamma, floor = parallel.put_replicated((folded, images, targets, gamma, floor), mesh)
    for chunk in (int(c) for c in args.chunk.split(",")):
        masks, _ = make_candidates(key, jnp.arange(chunk), template, ranges)
        masks = jax.device_put(masks, parallel.batch_sharded(mesh))
        scorer = score_masks.lower(folded, images, targets, masks, gamma, floor, objective=args.objective).compile()
        step = lambda: scorer(folded, images, targets, masks, gamma, floor)["objective"].block_until_ready()  # noqa: E731
        r = common.time_it(step, chunk, windows=args.windows, iters=args.iters)
        rows.append({"name": "scoring", "value": r["per_s"], "unit": "masks/s", "chunk": chunk,
                     "notes": f"{args.objective}, B={args.batch_images} images/mask, chunk={chunk}, {dtype_name}, "
                              f"{mesh.size} device(s)"
                              + (", space-to-depth stem" if conv.SPACE_TO_DEPTH else ""),
                     "images_per_s": r["per_s"] * args.batch_images, **r})
    return rows


def generation_row(args, template, ranges, key) -> dict:
    indices = jnp.arange(args.generation_chunk)
    generate = make_candidates.lower(key, indices, template, ranges).compile()
    r = common.time_it(lambda: generate(key, indices, template)[0].block_until_ready(), args.generation_chunk,
                       windows=args.windows, iters=args.iters)
    return {"name": "generation", "value": r["per_s"], "unit": "masks/s",
            "notes": f"max(strokes, S), {args.generation_chunk} per call", **r}


def forward_and_ebp_rows(args, folded, folded32, key) -> list[dict]:
    size = args.image_size
    batch = jax.random.uniform(key, (args.ebp_batch, size, size, 3), dtype=jnp.float32)
    targets = jax.random.randint(key, (args.ebp_batch,), 0, args.classes)
    infer = jax.jit(lambda f, x: forward(f, x)).lower(folded, batch).compile()
    r_fwd = common.time_it(lambda: infer(folded, batch).block_until_ready(), args.ebp_batch,
                           windows=args.windows, iters=args.iters)
    rows = [{"name": "forward", "value": r_fwd["per_s"], "unit": "images/s",
             "notes": f"BN-folded inference, batch {args.ebp_batch}, {jnp.dtype(folded['stem']['w'].dtype).name}",
             **r_fwd}]
    for name, weights in (("ebp", folded), ("ebp_fp32", folded32)):
        maps = saliency_maps.lower(weights, batch, targets, saliency_layer=args.saliency_layer).compile()
        r = common.time_it(lambda: maps(weights, batch, targets).block_until_ready(), args.ebp_batch,
                           windows=args.windows, iters=args.iters)
        rows.append({"name": name, "value": r["per_s"], "unit": "maps/s",
                     "notes": f"contrastive, {args.saliency_layer}, {jnp.dtype(weights['stem']['w'].dtype).name}; "
                              f"{r['per_s'] / r_fwd['per_s']:.2f} x forward",
                     "ratio_to_forward": r["per_s"] / r_fwd["per_s"], **r})
    return rows


def occlusion_row(args, folded, key) -> dict:
    """Maps/s of `occlusion_maps` (patch = an eighth of the side, stride half a patch), end to end."""
    size, patch = args.image_size, default_patch(args.image_size)
    images = jax.device_get(jax.random.uniform(key, (args.occlusion_batch, size, size, 3), dtype=jnp.float32))
    labels = jax.device_get(jax.random.randint(key, (args.occlusion_batch,), 0, args.classes))
    positions = len(patch_masks((size, size), patch, patch // 2))
    run = lambda: occlusion_maps(folded, images, labels, patch=patch, stride=patch // 2,  # noqa: E731
                                 batch_size=args.occlusion_batch, chunk=args.occlusion_chunk)
    r = common.time_it(run, args.occlusion_batch, warmup=1, windows=args.windows, iters=1)
    return {"name": "occlusion", "value": r["per_s"], "unit": "maps/s",
            "notes": f"{positions} patches of {patch} px per map, {args.occlusion_chunk} per call, batch "
                     f"{args.occlusion_batch}; {r['per_s'] * positions:,.0f} masked forwards/s", **r}


def main() -> None:
    parser = common.base_parser(__doc__)
    common.add_model_flags(parser)
    parser.add_argument("--batch_images", type=int, default=32, help="B: images each mask is scored on")
    parser.add_argument("--objective", choices=("ce", "verification"), default="ce",
                        help="the scoring objective (verification: 4 images per identity)")
    parser.add_argument("--chunk", default="256", help="masks per vmapped call (comma-separated to try several)")
    parser.add_argument("--ebp_batch", type=int, default=256)
    parser.add_argument("--generation_chunk", type=int, default=4096)
    parser.add_argument("--saliency_layer", default="layer3")
    parser.add_argument("--occlusion_batch", type=int, default=16, help="images per occlusion call")
    parser.add_argument("--occlusion_chunk", type=int, default=64, help="patch masks per vmapped call")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    args = parser.parse_args()
    stages = args.stages.split(",")
    if not set(stages) <= set(STAGES):
        parser.error(f"--stages takes a comma-separated subset of {STAGES}, got {args.stages!r}")
    if args.quick:
        common.quick_model(args)
        args.batch_images, args.chunk, args.ebp_batch, args.generation_chunk = 4, "8", 8, 64
        args.occlusion_batch, args.occlusion_chunk = 2, 16
    size, dtype = args.image_size, jnp.bfloat16 if args.bf16 else jnp.float32
    model = ResNet(depth=args.depth, num_classes=args.classes, width=args.width)
    variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
    folded = fold_batchnorm(variables, args.depth, dtype)
    key = jax.random.key(1)
    images = jax.random.uniform(key, (args.batch_images, size, size, 3), dtype=jnp.float32).astype(dtype)
    labels = (jax.random.randint(key, (args.batch_images,), 0, args.classes) if args.objective == "ce"
              else jnp.arange(args.batch_images) // max(1, min(IMAGES_PER_IDENTITY, args.batch_images // 2)))
    template = jnp.zeros((size, size), jnp.float32).at[size // 3: size // 2, size // 5: 4 * size // 5].set(1)
    ranges = StrokeRanges()
    rows = []
    if "scoring" in stages:
        rows += scoring_rows(args, folded, images, labels, template, ranges, key)
    if "generation" in stages:
        rows.append(generation_row(args, template, ranges, key))
    if "ebp" in stages:
        rows += forward_and_ebp_rows(args, folded, fold_batchnorm(variables, args.depth, jnp.float32), key)
    if "occlusion" in stages:
        rows.append(occlusion_row(args, folded, key))
    settings = vars(args) | {"json": str(args.json), "space_to_depth_stem": conv.SPACE_TO_DEPTH}
    common.finish("search_throughput", settings, rows, args.json)


if __name__ == "__main__":
    main()
