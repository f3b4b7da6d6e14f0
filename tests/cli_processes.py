"""Real ``pyro-storn`` processes for the fault tests: the command, an environment of one thread
outside any torchrun group, and a ``Popen`` that is always reaped."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["TIMEOUT_S", "cli", "cli_env", "cli_stopped_while_importing", "running", "sigkill",
           "wait_for"]

TIMEOUT_S = 240  # a loaded 2-core machine needs ~8 s to start one process
POLL_S = 0.01


def cli_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "pyro_storn.cli", *map(str, args)]


# Sends the process a signal from inside the import of module argv[1], then runs pyro-storn.
_STOP_WHILE_IMPORTING = """
import os, sys

class StopWhileImporting:
    def find_spec(self, name, path=None, target=None):
        if name == sys.argv[1]:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), int(sys.argv[2]))

sys.meta_path.insert(0, StopWhileImporting())
from pyro_storn.cli import main
sys.exit(main(sys.argv[3:]))
"""


def cli_stopped_while_importing(module: str, signum: int, *args: object) -> list[str]:
    """``pyro-storn *args``, sent ``signum`` while it imports ``module`` (the first time)."""
    return [sys.executable, "-c", _STOP_WHILE_IMPORTING, module, str(int(signum)),
            *map(str, args)]


@contextlib.contextmanager
def running(*args: object, **kwargs) -> Iterator[subprocess.Popen]:
    """``pyro-storn *args`` started with stderr piped; killed and reaped on the way out."""
    process = subprocess.Popen(cli(*args), env=cli_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, **kwargs)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=TIMEOUT_S)
        process.stderr.close()


def sigkill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=TIMEOUT_S) == -signal.SIGKILL


def wait_for(path: Path, process: subprocess.Popen) -> None:
    """Until ``path`` exists; fails with the process's stderr if it exits first."""
    deadline = time.monotonic() + TIMEOUT_S
    while not path.exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(POLL_S)
