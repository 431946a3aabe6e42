"""Small builders shared by tests: tiny identity folders and subprocess environments."""

from __future__ import annotations

import os
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


def subprocess_env(devices: int = 1) -> dict[str, str]:
    """Environment for a child Python: CPU JAX with `devices` simulated devices, shared compile cache."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(ROOT / ".cache" / "jax")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env
