"""Small builders shared by tests: tiny identity folders, a tiny search problem and subprocess
environments."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def write_identity_folder(root: Path, identities: int = 3, per_identity: int = 4, size: int = 20,
                          suffixes: tuple[str, ...] = (".png", ".jpg", ".pgm"), seed: int = 0) -> Path:
    """One sub-folder per identity, images of mixed formats with identity-specific content."""
    rng = np.random.default_rng(seed)
    for i in range(identities):
        folder = root / f"person{i:02d}"
        folder.mkdir(parents=True)
        base = rng.integers(0, 255, (size, size), dtype=np.uint8)
        for j in range(per_identity):
            pixels = np.clip(base.astype(int) + rng.integers(-10, 10, base.shape), 0, 255).astype(np.uint8)
            suffix = suffixes[j % len(suffixes)]
            image = Image.fromarray(pixels) if suffix == ".pgm" else Image.fromarray(np.stack([pixels] * 3, -1))
            image.save(folder / f"{j + 1:04d}{suffix}")
    return root


def tiny_search_problem(size: int = 32):
    """A tiny random ResNet (BN-folded), six images, their labels and a template band: the same
    arrays in every process, so a child with several devices can be compared with this one."""
    import jax

    from jaxdesens.models import ResNet
    from jaxdesens.models.functional import fold_batchnorm

    model = ResNet(depth=18, num_classes=4, width=0.125)
    images = jax.random.uniform(jax.random.key(0), (6, size, size, 3))
    variables = model.init(jax.random.key(1), images)
    labels = np.array([0, 1, 2, 3, 0, 1])
    template = np.zeros((size, size), np.float32)
    template[10:16, 6:26] = 1.0
    return fold_batchnorm(variables, 18), np.asarray(images), labels, template


def subprocess_env(devices: int = 1) -> dict[str, str]:
    """Environment for a child Python: CPU JAX with `devices` simulated devices, shared compile cache."""
    env = dict(os.environ)
    # Keep this process's other XLA flags (the convolution flag `import jaxdesens` set, see
    # jaxdesens/xla_flags.py): a child computing with other convolution kernels drifts apart from a
    # parent it is compared with (measured: 2% in a conv kernel after one federated round).
    kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(ROOT / ".cache" / "jax")
    # Every compile, however short: a child's eager ops (Flax's init runs op by op, ~150 compiles of
    # ~60 ms for a ResNet) then load from the cache in the next child instead of compiling again.
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def no_deprecation(*texts: str) -> None:
    """No output of a run mentions a deprecation (issue 16: the old Flower API's warnings were filtered)."""
    for text in texts:
        assert not re.search("deprecat", text, re.IGNORECASE), text[-3000:]
