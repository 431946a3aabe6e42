"""Face boxes and landmarks from dlib's offline models (the optional `faces` extra).

The models ship in the `face_recognition_models` package; it is located with
`importlib.util.find_spec` and never imported, because its `__init__` needs `pkg_resources`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from jaxdesens.data.errors import DataError

DETECTORS = ("hog", "cnn")
INSTALL_HINT = "pip install 'jaxdesens[faces]' (dlib-bin and face_recognition_models, offline models)"
DETECT_MAX_SIDE = 1280  # px: larger photos are searched for faces at this size (HOG is quadratic)
PREDICTOR_5 = "shape_predictor_5_face_landmarks.dat"
CNN_DETECTOR = "mmod_human_face_detector.dat"


def _dlib() -> Any:
    try:
        import dlib
    except ImportError as err:
        raise DataError(f"face alignment needs dlib, which is not installed: {INSTALL_HINT}") from err
    return dlib


def model_path(name: str) -> Path:
    """A model file of the `face_recognition_models` package, or a one-line error saying how to get it."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise DataError(f"face alignment needs dlib's models, which are not installed: {INSTALL_HINT}")
    path = Path(spec.origin).parent / "models" / name
    if not path.is_file():
        raise DataError(f"{path}: dlib model missing from face_recognition_models; reinstall it ({INSTALL_HINT})")
    return path


def faces_available() -> str | None:
    """None when dlib and its models are installed, else why not (with how to install them)."""
    try:
        _dlib()
        model_path(PREDICTOR_5)
    except DataError as err:
        return str(err)
    return None


@dataclasses.dataclass(frozen=True)
class Face:
    """A detected face: its box (left, top, right, bottom) and dlib's five landmarks (5, 2)."""

    box: tuple[int, int, int, int]
    landmarks: np.ndarray

    @property
    def area(self) -> int:
        left, top, right, bottom = self.box
        return max(0, right - left) * max(0, bottom - top)


class FaceFinder:
    """dlib's face detector (HOG, or the CNN: slower, finds turned and small faces) and its
    5-point shape predictor, loaded once."""

    def __init__(self, detector: str = "hog"):
        if detector not in DETECTORS:
            raise ValueError(f"--detector must be one of {', '.join(DETECTORS)}, got {detector!r}")
        dlib = _dlib()
        self.detector_name = detector
        self._dlib = dlib
        self._predictor = dlib.shape_predictor(str(model_path(PREDICTOR_5)))
        self._detector = (dlib.get_frontal_face_detector() if detector == "hog" else
                          dlib.cnn_face_detection_model_v1(str(model_path(CNN_DETECTOR))))

    def _boxes(self, image: np.ndarray, upsample: int) -> list[Any]:
        found = self._detector(image, upsample)
        return [d.rect if hasattr(d, "rect") else d for d in found]

    def find(self, image: np.ndarray) -> list[Face]:
        """Every face in a uint8 (H, W) or (H, W, 3) image, largest first.

        Large photos are searched at `DETECT_MAX_SIDE`; when nothing is found the search is
        repeated at twice the size (faces under ~80 px are below the HOG window). Landmarks are
        always predicted on the full-resolution image.
        """
        image = np.ascontiguousarray(image)
        shrink = max(1.0, max(image.shape[:2]) / DETECT_MAX_SIDE)
        small = image
        if shrink > 1:
            import cv2

            small = cv2.resize(image, (round(image.shape[1] / shrink), round(image.shape[0] / shrink)),
                               interpolation=cv2.INTER_AREA)
        boxes = self._boxes(small, 0) or self._boxes(small, 1)
        faces = []
        for box in boxes:
            rect = self._dlib.rectangle(*(round(v * shrink) for v in (box.left(), box.top(), box.right(),
                                                                       box.bottom())))
            shape = self._predictor(image, rect)
            parts = np.array([(p.x, p.y) for p in shape.parts()], np.float64)
            faces.append(Face((rect.left(), rect.top(), rect.right(), rect.bottom()), parts))
        return sorted(faces, key=lambda f: -f.area)


@functools.lru_cache(maxsize=2)
def face_finder(detector: str = "hog") -> FaceFinder:
    return FaceFinder(detector)
