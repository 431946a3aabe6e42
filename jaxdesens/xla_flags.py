"""The one XLA flag the project sets for itself, at `import jaxdesens`.

jaxlib 0.10.1 and 0.10.2 hand every XLA:CPU convolution to YNNPACK, which runs the ResNet's stem,
layer1 and stride-2 convolutions on one core (1.00 of 2 cores busy, measured) where XLA's own
Eigen convolutions use them all. `CONVOLUTION_FLAG` keeps convolutions on XLA's path (matrix
products stay with YNNPACK); the numbers agree to float32 rounding. The measured effect is in
the README's Performance section; the other CPU choices (im2col for tiny maps, the max-pool
gradient) are in `models/conv.py` and `models/pooling.py`.

Three constraints decide where and when it is set:
* XLA reads `XLA_FLAGS` once, when JAX starts its backend (the first `jax.devices()` or array,
  measured), and never again. Every entry point imports this package before it touches JAX, but
  some jobs import the models only after data loading has started the backend, so the package's
  `__init__` applies the flag, not `models/conv.py`. This module imports only the standard
  library, so `import jaxdesens` stays light.
* XLA aborts at start-up on a flag it does not know, so it is set only for jaxlib versions on
  which it was verified (`VERIFIED_JAXLIB`; 0.9.2 and 0.10.0 accept it but do not use YNNPACK
  for convolutions, so there it would change nothing).
* A user's own `XLA_FLAGS` is never touched: where the variable is set at all, even empty, the
  project leaves it alone (`XLA_FLAGS= python ...` is the way to opt out).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import warnings
from collections.abc import MutableMapping

CONVOLUTION_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
VERIFIED_JAXLIB = ("0.10.1", "0.10.2")

APPLIED = "applied"
USER_FLAGS = "left alone: XLA_FLAGS set by the user"
TOO_LATE = "not in effect: JAX's CPU backend started before jaxdesens was imported"


def installed_jaxlib() -> str | None:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def _backend_started() -> str | None:
    """The default backend's platform if JAX has already started one (JAX is not imported here)."""
    if "jax" not in sys.modules:
        return None
    from jax._src import xla_bridge

    return xla_bridge.get_backend().platform if xla_bridge.backends_are_initialized() else None


def set_convolution_flag(environ: MutableMapping[str, str], jaxlib_version: str | None) -> str:
    """Sets `XLA_FLAGS` in `environ` to `CONVOLUTION_FLAG` where that is safe; says what it did."""
    if "XLA_FLAGS" in environ:
        return USER_FLAGS
    if jaxlib_version not in VERIFIED_JAXLIB:
        return f"not applied: jaxlib {jaxlib_version} is not among the verified {', '.join(VERIFIED_JAXLIB)}"
    environ["XLA_FLAGS"] = CONVOLUTION_FLAG
    return APPLIED


def apply_convolution_flag() -> str:
    """`set_convolution_flag` on this process, with a warning where JAX's CPU backend has already
    read its flags (then they only reach child processes)."""
    status = set_convolution_flag(os.environ, installed_jaxlib())
    if status == APPLIED and _backend_started() == "cpu":
        warnings.warn(f"jaxdesens was imported after JAX started its CPU backend, so {CONVOLUTION_FLAG} "
                      "is not in effect in this process (YNNPACK keeps its convolutions on one core): import "
                      "jaxdesens first, or set XLA_FLAGS yourself before starting Python", stacklevel=3)
        return TOO_LATE
    return status


STATUS = apply_convolution_flag()
