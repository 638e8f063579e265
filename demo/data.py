"""The demo's data: two 5-class tasks cut from scikit-learn's digits, and the shift augmentation.

``sklearn.datasets.load_digits`` ships with scikit-learn, so nothing is downloaded.  The source
task is digits 0–4, the target task digits 5–9 relabelled 0–4 (:func:`load_tasks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["NUM_CLASSES", "SIDE", "Split", "digits", "load_tasks", "shift", "task"]

NUM_CLASSES = 5
"""Classes of each task."""

SIDE = 8
"""Side of the digit images (pixels)."""


@dataclass(frozen=True)
class Split:
    """Train and test tensors of one task (images ``(B, 8, 8)`` in ``[-1, 1]``, labels ``0..4``)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits: float32 pixels ``(N, 64)`` scaled to ``[-1, 1]`` and integer labels ``(N,)``."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    return (images.astype(np.float32) / 16.0) * 2.0 - 1.0, labels


def _as_images(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).reshape(-1, SIDE, SIDE)


def task(images: np.ndarray, labels: np.ndarray, classes: np.ndarray, seed: int,
         test_fraction: float = 0.3) -> Split:
    """The stratified train/test split (fixed by ``seed``) of the images whose label is in
    ``classes`` (consecutive), relabelled ``0 .. len(classes) - 1``."""
    from sklearn.model_selection import train_test_split

    mask = np.isin(labels, classes)
    x_tr, x_te, y_tr, y_te = train_test_split(images[mask], labels[mask] - int(min(classes)),
                                              test_size=test_fraction, random_state=seed, stratify=labels[mask])
    return Split(_as_images(x_tr), torch.from_numpy(y_tr).long(), _as_images(x_te), torch.from_numpy(y_te).long())


def load_tasks(seed: int = 0, test_fraction: float = 0.3) -> tuple[Split, Split]:
    """The source (digits 0–4) and target (digits 5–9, relabelled 0–4) tasks.

    Each is a stratified train/test split of ``sklearn.datasets.load_digits`` fixed by ``seed``.
    """
    images, labels = digits()
    source = np.arange(NUM_CLASSES)
    return (task(images, labels, source, seed, test_fraction),
            task(images, labels, source + NUM_CLASSES, seed, test_fraction))


def shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation of each image by up to one pixel (background ``-1`` fills the border)."""
    b, side = images.shape[0], images.shape[-1]
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    offsets = torch.randint(0, 3, (b, 2), generator=generator)
    rows = (offsets[:, 0, None] + torch.arange(side))[:, :, None]  # (b, side, 1)
    cols = (offsets[:, 1, None] + torch.arange(side))[:, None, :]  # (b, 1, side)
    return padded[torch.arange(b)[:, None, None], rows, cols]
