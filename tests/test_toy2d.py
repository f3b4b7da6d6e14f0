"""The 2-D toy data: generators against the published ProbAI 2022 files (two-sample tests, fixed
seeds, that can and do reject a wrongly parameterised generator), and the CSV loader's errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from scipy import stats

from pyro_storn.data import toy2d

N_PERMUTATIONS = 500
# Significance of the two-sample tests; the matched generators must not be rejected at it and
# the wrongly parameterised ones must be.
ALPHA = 0.01
# Kernel bandwidths (in pooled standard deviations) of the MMD test: the small ones see the
# width of a moon or a blob, the large one the overall layout.
MMD_BANDWIDTHS = (0.05, 0.2, 1.0)


def mmd_test(
    x: torch.Tensor, y: torch.Tensor, permutations: int = N_PERMUTATIONS, seed: int = 0
) -> float:
    """Permutation p-value of the (biased) squared maximum mean discrepancy between samples
    ``x`` and ``y`` (Gretton et al. 2012) with a sum of Gaussian kernels. All permutations at
    once: MMD² = s^T K s for the signed weights s = (1/n, ..., -1/m, ...)."""
    pooled = torch.cat([x, y]).double()
    pooled = (pooled - pooled.mean(0)) / pooled.std(0)
    squared = torch.cdist(pooled, pooled).square()
    kernel = sum(torch.exp(-squared / (2 * h * h)) for h in MMD_BANDWIDTHS)
    n, m = x.shape[0], y.shape[0]
    signs = torch.cat([torch.full((n,), 1.0 / n), torch.full((m,), -1.0 / m)]).double()
    generator = torch.Generator().manual_seed(seed)
    weights = torch.stack(
        [signs] + [signs[torch.randperm(n + m, generator=generator)] for _ in range(permutations)]
    )
    statistics = ((weights @ kernel) * weights).sum(1)
    return float((statistics[1:] >= statistics[0]).sum() + 1) / (permutations + 1)


def arc_residual(points: torch.Tensor) -> torch.Tensor:
    """Signed distance of each point to the nearer of the two moons' unit circles."""
    upper = torch.linalg.norm(points, dim=1) - 1
    lower = torch.linalg.norm(points - points.new_tensor([1.0, 0.5]), dim=1) - 1
    return torch.where(upper.abs() < lower.abs(), upper, lower)


def published(name: str) -> torch.Tensor:
    path = toy2d.find_file(name)
    if path is None:
        pytest.skip(f"published {name}.csv not found (set ${toy2d.DATA_DIR_ENV})")
    return toy2d.load_csv(path, dtype=torch.float64)


@pytest.mark.parametrize("name", ["two_moons", "two_blobs", "boomerang"])
def test_generator_matches_published_file(name):
    data = published(name)
    assert data.shape == (toy2d.PUBLISHED_SIZE, 2)
    generated = toy2d.GENERATORS[name](toy2d.PUBLISHED_SIZE, seed=1, dtype=torch.float64)
    assert mmd_test(generated, data) > ALPHA


@pytest.mark.parametrize(
    "name, wrong",
    [
        ("two_moons", {"noise": 0.2}),
        ("two_blobs", {"sd": 0.3}),
        ("two_blobs", {"centre": 0.6}),
        ("boomerang", {"curvature": 0.35}),
        ("boomerang", {"scale": 2.5}),
    ],
)
def test_wrong_generator_is_rejected(name, wrong):
    """The two-sample test has power: a generator with one parameter off is rejected."""
    data = published(name)
    generated = toy2d.GENERATORS[name](toy2d.PUBLISHED_SIZE, seed=1, dtype=torch.float64, **wrong)
    assert mmd_test(generated, data) <= ALPHA


@pytest.mark.parametrize("noise, matches", [(toy2d.MOONS_NOISE, True), (0.08, False)])
def test_two_moons_noise_level(noise, matches):
    """A sharper check of the noise: the distances to the arcs, generated vs published
    (two-sample Kolmogorov-Smirnov); 0.05 passes, 0.08 is rejected."""
    data = published("two_moons")
    generated = toy2d.two_moons(5000, noise=noise, seed=1, dtype=torch.float64)
    p_value = stats.ks_2samp(arc_residual(generated).numpy(), arc_residual(data).numpy()).pvalue
    assert (p_value > ALPHA) == matches, p_value


def test_two_blobs_order_matches_file():
    """The file is not shuffled: the first half is the (0.5, -0.5) blob; so is the generator's."""
    data = published("two_blobs")
    generated = toy2d.two_blobs(toy2d.PUBLISHED_SIZE, seed=1, dtype=torch.float64)
    half = toy2d.PUBLISHED_SIZE // 2
    for points in (data, generated):
        assert (points[:half, 0] > points[:half, 1]).float().mean() > 0.95
        assert (points[half:, 0] < points[half:, 1]).float().mean() > 0.95


def test_generators_are_seeded_and_shaped():
    for name, generator in toy2d.GENERATORS.items():
        first = generator(123, seed=7)
        assert first.shape == (123, 2) and first.dtype == torch.float32
        assert torch.equal(first, generator(123, seed=7)), name
        assert not torch.equal(first, generator(123, seed=8)), name
        assert torch.isfinite(first).all()
    with pytest.raises(ValueError, match="-3"):
        toy2d.two_moons(-3)
    with pytest.raises(ValueError, match="noise"):
        toy2d.two_moons(10, noise=-0.1)


def test_two_moons_geometry():
    """Noise-free moons lie on their unit half circles."""
    points = toy2d.two_moons(1000, noise=0.0, seed=0, dtype=torch.float64)
    upper = torch.linalg.norm(points, dim=1)
    lower = torch.linalg.norm(points - points.new_tensor([1.0, 0.5]), dim=1)
    on_a_circle = torch.minimum((upper - 1).abs(), (lower - 1).abs())
    assert on_a_circle.max() < 1e-12


def test_load_prefers_file_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv(toy2d.DATA_DIR_ENV, str(tmp_path))
    (tmp_path / "boomerang.csv").write_text("a,b\n1,2\n3,4\n")
    assert torch.equal(toy2d.load("boomerang"), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    generated = toy2d.load("boomerang", prefer_file=False, n=50, seed=3)
    assert torch.equal(generated, toy2d.boomerang(50, seed=3))
    with pytest.raises(ValueError, match="spiral"):
        toy2d.load("spiral")


# ------------------------------------------------------------------------------------ CSV loader


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "points.csv"
    path.write_text(text)
    return path


def test_csv_with_and_without_header(tmp_path):
    expected = torch.tensor([[1.0, 2.5], [-3.0, 4e-3]])
    assert torch.equal(toy2d.load_csv(write(tmp_path, "x,y\n1,2.5\n-3,4e-3\n")), expected)
    assert torch.equal(toy2d.load_csv(write(tmp_path, "1,2.5\n-3,4e-3\n\n")), expected)
    assert toy2d.load_csv(write(tmp_path, "1, 2.5\n-3 ,4e-3"), dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize(
    "text, line, value",
    [
        ("x,y\n1,2\n3,4,5\n", 3, "3,4,5"),  # ragged row
        ("x,y\n1,2\n3\n", 3, "3"),  # ragged row, short
        ("x,y\n1,2\nabc,4\n", 3, "abc"),  # text
        ("1,2\n3,nan\n", 2, "nan"),  # NaN
        ("1,2\ninf,3\n", 2, "inf"),  # infinity
        ("x\n1\n2\n", 1, "x"),  # one column
        ("1\n2\n", 1, "1"),  # one column, no header
        ("a,b,c\n1,2,3\n", 1, "a,b,c"),  # three columns
    ],
)
def test_csv_errors_name_file_line_and_value(tmp_path, text, line, value):
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as error:
        toy2d.load_csv(path)
    message = str(error.value)
    assert str(path) in message
    assert re.search(rf"line {line}\b", message), message
    assert value in message


def test_csv_empty_and_missing(tmp_path):
    with pytest.raises(ValueError, match="no data rows"):
        toy2d.load_csv(write(tmp_path, "x,y\n"))
    with pytest.raises(ValueError, match="no such file"):
        toy2d.load_csv(tmp_path / "absent.csv")
