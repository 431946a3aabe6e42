"""Where a face's landmarks go, and the similarity transform that puts them there.

The field aligns faces by five landmarks onto ArcFace's 112x112 template (eye centres, nose tip,
mouth corners). dlib's 5-point model (free for any use, unlike its 68-point model whose training
set, iBUG 300-W, excludes commercial use) gives the two corners of each eye and the *base* of the
nose, not the tip, and no mouth corners. Mapping the nose base onto ArcFace's nose tip would pull
every face up by about 8 px and put its mouth 10 px from the template's (measured on AT&T). So
the template here is ArcFace's, expressed in dlib's landmarks: the mean position, in ArcFace's
frame, of dlib's eye centres (the midpoint of each eye's two corners) and nose base, measured on
all 200 faces of AT&T identities s1-s20 (found by `faces.FaceFinder`), each face placed in the
frame by a least-squares similarity fit of its 68-point eye centres, nose tip and mouth corners to
ArcFace's five points. On identities s21-s40, aligning with these three points puts the 68-point
landmarks 3.60 px (mean over the five points) from ArcFace's template, against 3.28 px for a fit
to all five 68-point landmarks themselves and 6.04 px for the naive nose-base-on-nose-tip map
(README, "Align faces").
"""

from __future__ import annotations

import cv2
import numpy as np

TEMPLATE_SIZE = 112
# ArcFace (insightface) 112x112: left eye, right eye (as seen in the image), nose tip, mouth corners
ARCFACE_TEMPLATE = np.array([(38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366),
                             (41.5493, 92.3655), (70.7299, 92.2041)])
# The same frame in dlib 5-point terms: image-left eye centre, image-right eye centre, nose base
DLIB5_TEMPLATE = np.array([(37.15, 54.07), (74.47, 53.96), (55.95, 79.53)])


def template(size: int = TEMPLATE_SIZE, points: np.ndarray = DLIB5_TEMPLATE) -> np.ndarray:
    """Template points for a `size` x `size` output (the 112-px template scaled about the origin)."""
    return np.asarray(points, np.float64) * (size / TEMPLATE_SIZE)


def dlib5_points(parts: np.ndarray) -> np.ndarray:
    """(3, 2) image-left eye centre, image-right eye centre, nose base from dlib's 5 points
    (0-1: image-right eye corners, 2-3: image-left eye corners, 4: nose base)."""
    parts = np.asarray(parts, np.float64)
    return np.stack([(parts[2] + parts[3]) / 2, (parts[0] + parts[1]) / 2, parts[4]])


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 matrix of the rotation + uniform scale + shift that maps `source` points closest to
    `target` points in least squares (Umeyama 1991; no reflection)."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 2 or len(source) < 2:
        raise ValueError(f"need matching (N >= 2, 2) point sets, got {source.shape} and {target.shape}")
    mean_s, mean_t = source.mean(0), target.mean(0)
    s, t = source - mean_s, target - mean_t
    variance = (s ** 2).sum() / len(s)
    if variance == 0:
        raise ValueError("the source points coincide; no transform maps them onto a template")
    u, sigma, vt = np.linalg.svd(t.T @ s / len(s))
    d = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ d @ vt
    scale = np.trace(np.diag(sigma) @ d) / variance
    return np.hstack([scale * rotation, (mean_t - scale * rotation @ mean_s)[:, None]])


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def warp(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """`image` (H, W) or (H, W, 3) uint8 resampled into a `size` x `size` output by `matrix`
    (output = matrix @ input); outside the photo is black. A face shrunk more than 2x is first
    reduced by area averaging, so the output does not alias."""
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    factor = int(1 / scale) if scale < 0.5 else 1
    if factor > 1:
        height, width = image.shape[:2]
        image = cv2.resize(image, (max(1, width // factor), max(1, height // factor)), interpolation=cv2.INTER_AREA)
        step = np.array([width / image.shape[1], height / image.shape[0]])
        # reduced pixel x' covers input pixels around x = step * x' + (step - 1) / 2
        matrix = np.hstack([matrix[:, :2] * step, (matrix[:, 2] + matrix[:, :2] @ ((step - 1) / 2))[:, None]])
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)
