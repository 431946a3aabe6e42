"""Input-pipeline throughput (images/s): decoding an identity folder, the grain training
pipeline over the decoded set in memory, and over the preprocessed array_record source.

    python benchmarks/pipeline_throughput.py --images 20000 --image_size 112 --batch 256 --json out.json

The identity folder is generated (synthetic faces written as PNG) in a temporary directory.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from pathlib import Path

import common  # noqa: F401
import numpy as np
from absl import flags
from PIL import Image

from jaxdesens.data import SyntheticConfig, make_synthetic, read_identity_folder
from jaxdesens.data.pipeline import ArraySource, train_batches


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / f"id{label:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:07d}.png", compress_level=1)


def pipeline_rate(source, batch: int, steps: int, threads: int) -> float:
    iterator = train_batches(source, batch, steps + 2, seed=0, threads=threads)
    next(iterator)
    start, count = time.perf_counter(), 0
    for item in iterator:
        count += len(item["label"])
    return count / (time.perf_counter() - start)


def main() -> None:
    flags.FLAGS.mark_as_parsed()  # grain reads absl flags
    parser = common.base_parser(__doc__)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 2))
    args = parser.parse_args()
    if args.quick:
        args.images, args.image_size, args.batch, args.steps = 64, 32, 8, 4
    per_identity = 20
    data = make_synthetic(SyntheticConfig(identities=max(2, args.images // per_identity),
                                          images_per_identity=per_identity, image_size=args.image_size))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "faces"
        write_folder(root, data.images, data.labels)
        start = time.perf_counter()
        decoded = read_identity_folder(root, args.image_size)
        rows.append({"name": "decode_folder", "value": len(decoded) / (time.perf_counter() - start),
                     "unit": "images/s", "notes": f"{len(decoded)} PNG files, thread pool"})
        rate = pipeline_rate(ArraySource(decoded.images, decoded.labels), args.batch, args.steps, args.threads)
        rows.append({"name": "pipeline_memory", "value": rate, "unit": "images/s",
                     "notes": f"grain, in-memory set, batch {args.batch}, {args.threads} threads, flips"})
        skipped = []
        # tensorflow-datasets is absent where only the in-memory path can be measured (the GPU image).
        if importlib.util.find_spec("tensorflow_datasets") is None:
            skipped.append("pipeline_arrayrecord: tensorflow-datasets is not installed")
        else:
            from jaxdesens.data.arrayrecord import open_identity_arrayrecord, write_identity_arrayrecord

            record_dir = write_identity_arrayrecord(decoded, Path(tmp) / "records", args.image_size)
            rate = pipeline_rate(open_identity_arrayrecord(record_dir), args.batch, args.steps, args.threads)
            rows.append({"name": "pipeline_arrayrecord", "value": rate, "unit": "images/s",
                         "notes": f"grain, array_record source, batch {args.batch}, {args.threads} threads"})
    settings = vars(args) | {"json": str(args.json), "skipped": skipped}
    common.finish("pipeline_throughput", settings, rows, args.json)


if __name__ == "__main__":
    main()
