"""Hostile but realistic input to the entry points besides ``pyro-storn`` (the examples, the demo,
the JSB Chorales page, the benchmarks), as a table.

Each case runs the real script in a subprocess from a working directory that holds only a file
and a folder to aim at. A refusal must exit 2 with one line on stderr, ``PROG: error: ...``, that
names the bad value, and leave the directory as it was: the checks come before any work.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_processes import TIMEOUT_S, cli_env

REPO = Path(__file__).resolve().parents[1]


def _example(name: str) -> tuple[list[str], str]:
    return [str(REPO / "examples" / name)], name


def _module(name: str) -> tuple[list[str], str]:
    return ["-m", name], f"python -m {name}"


DENSITY = _example("density_2d.py")
AUTOGUIDE = _example("autoguide_flows.py")
CONV_PLANAR = _example("conv_planar_jacobian.py")
PENDULUM = _example("storn_pendulum.py")
ENERGY = _example("energy_2d.py")
LATENT_USE = _example("storn_latent_use.py")
DEMO = _module("pyro_storn.demo")
JSB_TABLE = _module("pyro_storn.jsb_table")
BENCHMARKS = _module("benchmarks")

# (entry point, argv, fragment of the one stderr line). In the working directory, ``afile`` is a
# regular file and ``adir`` an empty folder.
CASES = [
    (DENSITY, ["--seconds", "nan"], "--seconds must be positive, got nan"),
    (DENSITY, ["--out", "afile"], "--out 'afile' exists and is not a directory"),
    (AUTOGUIDE, ["--out", "figures", "--doc", "adir"], "--doc 'adir' is a directory, not a file"),
    (CONV_PLANAR, ["--out", "afile/sub"], "--out 'afile/sub'"),
    (CONV_PLANAR, ["--kernel-size", "4", "--out", "out"], "--kernel-size must be odd"),
    (PENDULUM, ["--epochs", "0"], "--epochs must be a positive int, got 0"),
    (PENDULUM, ["--notes-file", "notes.md"], "--notes-file 'notes.md': cannot read"),
    (PENDULUM, ["--flows", "plnar"], "no flow of 'plnar' is registered"),
    (ENERGY, ["--flow-length", "4,x"],
     "argument --flow-length: expected comma-separated ints, got '4,x'"),
    (ENERGY, ["--out", "afile"], "--out 'afile' exists and is not a directory"),
    (LATENT_USE, ["afile"], "'afile' is not a run directory (it is a file)"),
    (DEMO, ["--flow-length", "-1"], "--flow-length must be a positive int, got -1"),
    (DEMO, ["--out", "afile/demo"], "--out 'afile/demo'"),
    (JSB_TABLE, ["adir", "--out", "adir"], "--out 'adir' is a directory, not a file"),
    (JSB_TABLE, ["adir", "--out", "page.md"], "'adir' is not a run directory (no config.json)"),
    (BENCHMARKS, ["--smoke", "--out", "afile"], "--out 'afile' exists and is not a directory"),
]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime."""
    return {str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in root.rglob("*")}


@pytest.mark.parametrize("entry_point, argv, fragment", CASES,
                         ids=[f"{entry[1]} {' '.join(argv)}" for entry, argv, _ in CASES])
def test_bad_input_is_one_line_and_exit_2_writing_nothing(tmp_path, entry_point, argv, fragment):
    (tmp_path / "afile").write_text("a user's file\n")
    (tmp_path / "adir").mkdir()
    before = _tree(tmp_path)
    command, prog = entry_point
    env = {**cli_env(), "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, *command, *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), done.stderr
    assert fragment in lines[0]
    assert _tree(tmp_path) == before
