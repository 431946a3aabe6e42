"""Who tries to name the people in an export: the attackers' common shape, and two of them.

An attacker embeds the clean gallery it holds and the desensitized probes it was given; the
audit compares the two (`reid.identification_report`). Attackers never see identity labels:
only images, and the export's mask (which ships with the export, so a recipient has it).
The off-the-shelf face recognizer is in `privacy/dlib_face.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:  # only a type here: importing the recognizer pulls in the input pipeline (grain)
    from jaxdesens.recognizer import Recognizer


class Attacker(Protocol):
    """`metric` is how its embeddings compare ("cosine" or "euclidean", see `reid.similarity`)."""

    name: str
    metric: str

    def embed_gallery(self, images: np.ndarray) -> np.ndarray:
        """(G, D) embeddings of clean NHWC float images in [0, 1]."""

    def embed_probes(self, images: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """(P, D) embeddings of desensitized images; `mask` (1 = visible) when they are masked."""


class PixelAttacker:
    """The naive attacker: raw pixels, mean-centred per image, compared by cosine similarity.

    A lower bound any real attacker should beat; also what the tests use, since it needs no model.
    """

    name = "pixels"
    metric = "cosine"

    def _embed(self, images: np.ndarray) -> np.ndarray:
        flat = np.asarray(images, np.float64).reshape(len(images), -1)
        return flat - flat.mean(axis=1, keepdims=True)

    def embed_gallery(self, images: np.ndarray) -> np.ndarray:
        return self._embed(images)

    def embed_probes(self, images: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        return self._embed(images)


class RecognizerAttacker:
    """A `Recognizer` trained by the recipient, e.g. on the export itself: the strongest insider.

    Masked probes are embedded with the mask (an FSM model is fed it, as on its training data);
    the clean gallery with none, which for an FSM model is the plain backbone (Situation 2).
    """

    metric = "cosine"

    def __init__(self, recognizer: Recognizer, name: str = "recipient", batch_size: int = 128):
        self.recognizer, self.name, self.batch_size = recognizer, name, batch_size

    def _check(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        expected = (self.recognizer.config.image_size, self.recognizer.config.image_size,
                    self.recognizer.config.channels)
        if images.shape[1:] != expected:
            raise ValueError(f"attacker {self.name!r} was trained on {expected} images, the audit has "
                             f"{images.shape[1:]}; run the audit with --image_size={expected[0]}")
        return images

    def embed_gallery(self, images: np.ndarray) -> np.ndarray:
        return self.recognizer.embed(self._check(images), batch_size=self.batch_size)

    def embed_probes(self, images: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        return self.recognizer.embed(self._check(images), mask=mask, batch_size=self.batch_size)
