"""The embedded default data: procedurally drawn, aligned faces with stable identities.

Each identity has its own fixed geometry (face shape, eye spacing and size, brows, nose, mouth,
hairline), colouring, skin texture and accessories (glasses, beard). Every image of it varies in
pose (shift, scale, roll, yaw), lighting direction and strength, expression (smile, open mouth,
eye openness), background and sensor noise. Identities therefore differ in subtle, spatially
localised cues, which is what a face recognizer and an EBP saliency map must find.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

from jaxdesens.data.identity import IdentitySet

GENERATOR_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    identities: int = 96
    images_per_identity: int = 12
    image_size: int = 64
    channels: int = 3
    seed: int = 0


def _u(rng: np.random.Generator, low: float, high: float, n: int) -> np.ndarray:
    return rng.uniform(low, high, n).astype(np.float32)


def _identity_traits(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    tone = rng.uniform(0, 1, (n, 1)).astype(np.float32)
    light_skin, dark_skin = np.asarray([0.95, 0.80, 0.70], np.float32), np.asarray([0.42, 0.29, 0.21], np.float32)
    skin = (1 - tone) * light_skin + tone * dark_skin + rng.uniform(-0.04, 0.04, (n, 3)).astype(np.float32)
    hair = rng.uniform(0.03, 0.55, (n, 1)).astype(np.float32) * np.asarray([1.0, 0.8, 0.6], np.float32)
    return {
        "face_a": _u(rng, 0.58, 0.74, n), "face_b": _u(rng, 0.78, 0.92, n),
        "eye_dx": _u(rng, 0.20, 0.34, n), "eye_y": _u(rng, -0.22, -0.06, n),
        "eye_w": _u(rng, 0.07, 0.13, n), "eye_h": _u(rng, 0.035, 0.065, n),
        "iris": _u(rng, 0.05, 0.45, n), "brow_gap": _u(rng, 0.07, 0.16, n),
        "brow_tilt": _u(rng, -0.35, 0.35, n), "brow_w": _u(rng, 0.09, 0.16, n),
        "brow_t": _u(rng, 0.012, 0.035, n), "nose_len": _u(rng, 0.14, 0.30, n),
        "nose_w": _u(rng, 0.03, 0.08, n), "mouth_y": _u(rng, 0.30, 0.48, n),
        "mouth_w": _u(rng, 0.12, 0.26, n), "lip_t": _u(rng, 0.018, 0.05, n),
        "hairline": _u(rng, -0.75, -0.42, n), "hair_wave": _u(rng, 0.0, 0.10, n),
        "hair_freq": _u(rng, 2.0, 7.0, n), "hair_phase": _u(rng, 0, 2 * np.pi, n),
        "glasses": (rng.uniform(size=n) < 0.25).astype(np.float32),
        "beard": (rng.uniform(size=n) < 0.2).astype(np.float32),
        "skin": skin, "hair": hair, "lip": skin * np.asarray([0.85, 0.55, 0.55], np.float32),
        "tex_freq": rng.uniform(2.0, 9.0, (n, 4, 2)).astype(np.float32),
        "tex_phase": rng.uniform(0, 2 * np.pi, (n, 4)).astype(np.float32),
        "tex_amp": _u(rng, 0.03, 0.10, n),
    }


def _image_nuisance(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        "tx": _u(rng, -0.07, 0.07, n), "ty": _u(rng, -0.06, 0.06, n), "scale": _u(rng, 0.9, 1.08, n),
        "roll": _u(rng, -0.16, 0.16, n), "yaw": _u(rng, -0.12, 0.12, n),
        "light_dir": _u(rng, 0, 2 * np.pi, n), "light": _u(rng, 0.0, 0.45, n), "gain": _u(rng, 0.75, 1.2, n),
        "smile": _u(rng, -1.0, 1.6, n), "open": np.maximum(0, _u(rng, -0.6, 1.0, n)),
        "eye_open": _u(rng, 0.35, 1.0, n), "bg": _u(rng, 0.02, 0.4, n), "noise": _u(rng, 0.01, 0.05, n),
    }


def _soft(sdf: np.ndarray, pixel: float) -> np.ndarray:
    """Anti-aliased coverage of the region where the signed distance `sdf` is negative."""
    return np.clip(0.5 - sdf / pixel, 0.0, 1.0)


def _ellipse(x, y, cx, cy, a, b):
    return (np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2) - 1.0) * np.minimum(a, b)


def _paint(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    return canvas * (1 - alpha[..., None]) + alpha[..., None] * colour


def render_faces(traits: dict[str, np.ndarray], nuis: dict[str, np.ndarray], size: int,
                 noise: np.ndarray) -> np.ndarray:
    """Draws one face per row of `traits` / `nuis` (both indexed per image); returns float RGB [0, 1]."""
    n = len(nuis["tx"])
    col = lambda v: np.asarray(v, np.float32).reshape(n, 1, 1)  # noqa: E731
    t = {k: (col(v) if v.ndim == 1 else v) for k, v in traits.items()}
    q = {k: col(v) for k, v in nuis.items()}
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    u, v = np.meshgrid(grid, grid)
    u, v = u[None], v[None]
    pixel = 2.0 / size
    # Image coordinates -> face coordinates (undo shift, roll and scale).
    cu, cv = (u - q["tx"]) / q["scale"], (v - q["ty"]) / q["scale"]
    cos, sin = np.cos(q["roll"]), np.sin(q["roll"])
    x, y = cos * cu + sin * cv, -sin * cu + cos * cv
    yaw = q["yaw"]
    fx = x - yaw * 0.6  # inner features move with yaw more than the outline does

    canvas = np.broadcast_to((q["bg"] * (1 + 0.3 * v))[..., None], (n, size, size, 3)).copy()
    face_a, face_b = t["face_a"], t["face_b"]
    hair = t["hair"][:, None, None, :]
    head = _soft(_ellipse(x, y + 0.05, -yaw * 0.2, 0.0, face_a * 1.12, face_b * 1.1), pixel)
    hairline = t["hairline"] + t["hair_wave"] * np.sin(t["hair_freq"] * x + t["hair_phase"])
    canvas = _paint(canvas, head * (y < hairline + 0.25) * 1.0, hair)
    face = _soft(_ellipse(x, y, -yaw * 0.2, 0.0, face_a, face_b), pixel)
    tex = sum(np.sin(t["tex_freq"][:, i, 0, None, None] * x * np.pi + t["tex_freq"][:, i, 1, None, None] * y * np.pi
                     + t["tex_phase"][:, i, None, None]) for i in range(4)) / 4
    light = 1 + q["light"] * (np.cos(q["light_dir"]) * x + np.sin(q["light_dir"]) * y)
    skin = t["skin"][:, None, None, :] * (1 + t["tex_amp"][..., None] * tex[..., None])
    canvas = _paint(canvas, face, skin)
    canvas = _paint(canvas, face * _soft(y - hairline, pixel), hair)
    beard = face * _soft(-(y - (t["mouth_y"] - 0.08)), pixel) * t["beard"]
    canvas = _paint(canvas, beard * 0.85, hair * 0.8)

    for side in (-1.0, 1.0):
        ex = side * t["eye_dx"] * (1 + side * yaw)
        ey = t["eye_y"]
        brow_y = ey - t["brow_gap"] + side * t["brow_tilt"] * (fx - ex) * 0.5
        brow = _soft(np.maximum(np.abs(fx - ex) - t["brow_w"], np.abs(y - brow_y) - t["brow_t"]), pixel)
        canvas = _paint(canvas, brow * face, hair * 0.7)
        eye_h = t["eye_h"] * q["eye_open"]
        sclera = _soft(_ellipse(fx, y, ex, ey, t["eye_w"], eye_h), pixel)
        canvas = _paint(canvas, sclera, np.asarray([0.92, 0.9, 0.88], np.float32))
        iris = sclera * _soft(np.hypot(fx - ex, y - ey) - t["eye_h"] * 0.9, pixel)
        canvas = _paint(canvas, iris, (t["iris"][..., None] * np.asarray([0.7, 0.9, 1.0], np.float32)))
        pupil = sclera * _soft(np.hypot(fx - ex, y - ey) - t["eye_h"] * 0.4, pixel)
        canvas = _paint(canvas, pupil, np.zeros(3, np.float32))
        ring = np.abs(np.hypot((fx - ex) / 1.1, y - ey) - t["eye_w"] * 1.35) - 0.012
        canvas = _paint(canvas, _soft(ring, pixel) * t["glasses"], np.full(3, 0.08, np.float32))

    bridge = np.maximum(np.abs(y - t["eye_y"]) - 0.01, np.abs(fx) - (t["eye_dx"] - t["eye_w"] * 1.3))
    canvas = _paint(canvas, _soft(bridge, pixel) * t["glasses"], np.full(3, 0.08, np.float32))
    nose_top, nose_bot = t["eye_y"] + 0.05, t["eye_y"] + 0.05 + t["nose_len"]
    nose = _soft(np.maximum(np.abs(fx - yaw * 0.3) - t["nose_w"] * (y - nose_top) / t["nose_len"],
                            np.maximum(nose_top - y, y - nose_bot)), pixel)
    canvas = _paint(canvas, nose * face * 0.35, skin * 0.55)
    for side in (-1.0, 1.0):
        nostril = _soft(_ellipse(fx, y, side * t["nose_w"] * 0.8 + yaw * 0.3, nose_bot, 0.025, 0.015), pixel)
        canvas = _paint(canvas, nostril * face, skin * 0.35)

    mx = yaw * 0.3
    curve = t["mouth_y"] - q["smile"] * 0.6 * ((fx - mx) ** 2 - (t["mouth_w"] ** 2) / 2) / 2
    half_t = t["lip_t"] + q["open"] * 0.03
    mouth = _soft(np.maximum(np.abs(fx - mx) - t["mouth_w"], np.abs(y - curve) - half_t), pixel)
    canvas = _paint(canvas, mouth * face, t["lip"][:, None, None, :])
    gap = _soft(np.maximum(np.abs(fx - mx) - t["mouth_w"] * 0.8, np.abs(y - curve) - q["open"] * 0.025), pixel)
    canvas = _paint(canvas, gap * face * (q["open"] > 0.05), np.full(3, 0.05, np.float32))

    canvas = canvas * (light * q["gain"])[..., None]
    canvas = canvas + noise * q["noise"][..., None]
    return np.clip(canvas, 0.0, 1.0)


def make_synthetic(config: SyntheticConfig = SyntheticConfig(), chunk: int = 256) -> IdentitySet:
    """Generates the whole set deterministically from `config.seed`."""
    rng = np.random.default_rng(config.seed)
    traits = _identity_traits(rng, config.identities)
    labels = np.repeat(np.arange(config.identities, dtype=np.int32), config.images_per_identity)
    nuis = _image_nuisance(rng, len(labels))
    images = np.empty((len(labels), config.image_size, config.image_size, config.channels), np.uint8)
    for start in range(0, len(labels), chunk):
        sl = slice(start, start + chunk)
        per_image = {k: v[labels[sl]] for k, v in traits.items()}
        noise = rng.standard_normal((len(labels[sl]), config.image_size, config.image_size, 1)).astype(np.float32)
        rgb = render_faces(per_image, {k: v[sl] for k, v in nuis.items()}, config.image_size, noise)
        if config.channels == 1:
            rgb = rgb @ np.asarray([[0.299], [0.587], [0.114]], np.float32)
        images[sl] = np.round(rgb * 255).astype(np.uint8)
    names = tuple(f"synthetic{i:05d}" for i in range(config.identities))
    spec = json.dumps({"version": GENERATOR_VERSION, **dataclasses.asdict(config)}, sort_keys=True)
    return IdentitySet(images, labels, names, hashlib.sha256(spec.encode()).hexdigest()[:16],
                       source=f"synthetic:{spec}")
