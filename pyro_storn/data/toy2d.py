"""Two-dimensional toy data: the ProbAI 2022 (DT8122) normalizing-flow data sets and a loader for
any two-column CSV.

The summer school published three files of 500 points each (``two_moons.csv``, ``two_blobs.csv``,
``boomerang.csv``, header ``feature_1,feature_2``) without the code that drew them. The
generators here have the parameters those files are consistent with (least-squares fits of the
published points; ``tests/test_toy2d.py`` checks each generator against its file with a
two-sample maximum-mean-discrepancy test):

- ``two_moons``: two interleaved half circles, :math:`(\\cos s, \\sin s)` and
  :math:`(1 - \\cos s, 1/2 - \\sin s)` for :math:`s \\sim U(0, \\pi)`, plus
  :math:`\\mathcal{N}(0, 0.05^2 I)` noise, rows shuffled.
- ``two_blobs``: half the points from :math:`\\mathcal{N}((0.5, -0.5), 0.2^2 I)`, then half from
  :math:`\\mathcal{N}((-0.5, 0.5), 0.2^2 I)` (not shuffled, as in the file).
- ``boomerang``: :math:`x_2 \\sim \\mathcal{N}(0.5, 3.7^2)`,
  :math:`x_1 = x_2^2 / 4 + \\mathcal{N}(0, 1)`.

:func:`load` returns the published file when it is found (``$PYRO_STORN_TOY2D_DIR``, or
``../shared/data/probai2022`` next to the repository), the generator's points otherwise.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import torch

from ..validation import check_positive_int

__all__ = [
    "two_moons",
    "two_blobs",
    "boomerang",
    "GENERATORS",
    "load_csv",
    "find_file",
    "load",
]

# Parameters matched to the published files (see the module docstring).
MOONS_NOISE = 0.05
BLOBS_CENTRE = 0.5
BLOBS_SD = 0.2
BOOMERANG_LOC = 0.5
BOOMERANG_SCALE = 3.7
BOOMERANG_CURVATURE = 0.25
BOOMERANG_NOISE = 1.0

PUBLISHED_SIZE = 500
DATA_DIR_ENV = "PYRO_STORN_TOY2D_DIR"


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


def two_moons(
    n: int = PUBLISHED_SIZE,
    *,
    noise: float = MOONS_NOISE,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``n`` points on two interleaved half circles with Gaussian noise of sd ``noise``."""
    check_positive_int("n", n)
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    generator = _generator(seed)
    n_upper = (n + 1) // 2
    angle = torch.rand(n, generator=generator, dtype=torch.float64) * math.pi
    upper = torch.stack([angle[:n_upper].cos(), angle[:n_upper].sin()], dim=1)
    lower = torch.stack([1 - angle[n_upper:].cos(), 0.5 - angle[n_upper:].sin()], dim=1)
    points = torch.cat([upper, lower]) + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    points = points[torch.randperm(n, generator=generator)]
    return points.to(dtype)


def two_blobs(
    n: int = PUBLISHED_SIZE,
    *,
    centre: float = BLOBS_CENTRE,
    sd: float = BLOBS_SD,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The first ``n // 2`` points from N((c, -c), sd² I), the rest from N((-c, c), sd² I)."""
    check_positive_int("n", n)
    if sd < 0:
        raise ValueError(f"sd must be >= 0, got {sd!r}")
    generator = _generator(seed)
    n_first = n // 2
    centres = torch.tensor([[centre, -centre]] * n_first + [[-centre, centre]] * (n - n_first), dtype=torch.float64)
    points = centres + sd * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return points.to(dtype)


def boomerang(
    n: int = PUBLISHED_SIZE,
    *,
    loc: float = BOOMERANG_LOC,
    scale: float = BOOMERANG_SCALE,
    curvature: float = BOOMERANG_CURVATURE,
    noise: float = BOOMERANG_NOISE,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``x2 ~ N(loc, scale²)``, ``x1 = curvature * x2² + N(0, noise²)``: a parabola opening to
    the right (columns ordered as in the published file)."""
    check_positive_int("n", n)
    if scale < 0 or noise < 0:
        raise ValueError(f"scale and noise must be >= 0, got {scale!r}, {noise!r}")
    generator = _generator(seed)
    second = loc + scale * torch.randn(n, generator=generator, dtype=torch.float64)
    first = curvature * second.square() + noise * torch.randn(n, generator=generator, dtype=torch.float64)
    return torch.stack([first, second], dim=1).to(dtype)


GENERATORS: dict[str, Callable[..., torch.Tensor]] = {
    "two_moons": two_moons,
    "two_blobs": two_blobs,
    "boomerang": boomerang,
}


def load_csv(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An ``(N, 2)`` tensor from a CSV of two numeric columns, with or without a header line.

    Raises ``ValueError`` naming the file, the line and the offending value for a ragged row, a
    non-numeric or non-finite value, fewer (or more) than two columns, or no rows at all.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    rows: list[tuple[float, float]] = []
    with path.open(newline="") as handle:
        lines = handle.read().splitlines()
    width: int | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if width is None:
            width = len(fields)
            if width < 2:
                raise ValueError(
                    f"{path}, line {number}: needs 2 columns, found {width} ({line.strip()!r})"
                )
            if width > 2:
                raise ValueError(
                    f"{path}, line {number}: needs exactly 2 columns, found {width} "
                    f"({line.strip()!r})"
                )
            if not rows and not _all_numeric(fields):
                # The first non-empty line may be a header (e.g. "feature_1,feature_2").
                continue
        if len(fields) != width:
            raise ValueError(
                f"{path}, line {number}: ragged row with {len(fields)} field(s), expected "
                f"{width} ({line.strip()!r})"
            )
        values = []
        for value in fields:
            try:
                number_value = float(value)
            except ValueError:
                raise ValueError(f"{path}, line {number}: not a number: {value!r}") from None
            if not math.isfinite(number_value):
                raise ValueError(f"{path}, line {number}: not a finite number: {value!r}")
            values.append(number_value)
        rows.append((values[0], values[1]))
    if not rows:
        raise ValueError(f"{path}: no data rows")
    return torch.tensor(rows, dtype=dtype)


def _all_numeric(fields: list[str]) -> bool:
    try:
        for value in fields:
            float(value)
    except ValueError:
        return False
    return True


def find_file(name: str) -> Path | None:
    """The published ``<name>.csv`` if it can be found, else ``None``."""
    if name not in GENERATORS:
        raise ValueError(f"unknown data set {name!r}; valid choices: {', '.join(GENERATORS)}")
    candidates = []
    if os.environ.get(DATA_DIR_ENV):
        candidates.append(Path(os.environ[DATA_DIR_ENV]))
    repo_root = Path(__file__).resolve().parents[2]
    candidates.append(repo_root.parent / "shared" / "data" / "probai2022")
    candidates.append(repo_root / "data" / "probai2022")
    for directory in candidates:
        path = directory / f"{name}.csv"
        if path.is_file():
            return path
    return None


def load(
    name: str,
    *,
    n: int = PUBLISHED_SIZE,
    seed: int = 0,
    prefer_file: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Data set ``name``: the published file when found and ``prefer_file`` (its 500 points,
    ``n`` ignored), otherwise ``n`` points from the matched generator with ``seed``."""
    path = find_file(name)
    if prefer_file and path is not None:
        return load_csv(path, dtype=dtype)
    return GENERATORS[name](n, seed=seed, dtype=dtype)
