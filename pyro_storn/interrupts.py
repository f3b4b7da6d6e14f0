"""Stopping on a signal: SIGTERM (what ``kill``, systemd, SLURM and docker send) does what Ctrl-C
(SIGINT) does.

Outside the training loop SIGTERM raises :class:`Terminated`, a ``KeyboardInterrupt``, so that the
cleanup written for Ctrl-C runs for it too (a run directory's lock released, temporary files
removed). Neither raises inside an import (:func:`raise_on_stop`): there the exception can be
swallowed by C code (torch's C initialisation clears a failed NumPy import and goes on) or leave
half-imported modules behind (a NumPy whose lazy submodule lookup then recurses without end), so
the signal is sent again until it lands outside one. Inside the loop both signals become an
:class:`InterruptFlag` that the loop reads between steps, so that no step is left half applied and
the checkpoint it writes resumes exactly.
A process stopped by signal ``N`` exits ``128 + N`` (:func:`exit_code`): 130 for Ctrl-C, 143 for
SIGTERM, as a shell reports it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["STOP_SIGNALS", "InterruptFlag", "Terminated", "exit_code", "raise_on_stop",
           "signal_of"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How soon a signal that landed in an import is sent again: short to a user, long to an import step.
RESEND_S = 0.05


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised where Ctrl-C raises ``KeyboardInterrupt``."""


def signal_of(stop: BaseException) -> int:
    """The signal a ``KeyboardInterrupt`` stands for."""
    return signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT


def exit_code(signum: int) -> int:
    return 128 + int(signum)


def _raise_for(signum: int) -> None:
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # signal.signal's rule


def _importing(frame: Any) -> bool:
    """Whether ``frame`` runs inside an import: importlib's frames are on its stack (also when
    C code imports, as torch's initialisation imports NumPy)."""
    while frame is not None:
        if frame.f_globals.get("__name__") == "importlib._bootstrap":
            return True
        frame = frame.f_back
    return False


class _RaiseOutsideImports:
    """The handler of :func:`raise_on_stop`."""

    def __init__(self) -> None:
        self._resend: threading.Timer | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if not _importing(frame):
            _raise_for(signum)
        self._resend = threading.Timer(RESEND_S, os.kill, (os.getpid(), signum))
        self._resend.daemon = True
        self._resend.start()

    def cancel(self) -> None:
        if self._resend is not None:
            self._resend.cancel()


@contextlib.contextmanager
def raise_on_stop() -> Iterator[None]:
    """Ctrl-C raises ``KeyboardInterrupt`` and SIGTERM :class:`Terminated` in the ``with`` block,
    outside imports: one that lands in an import is sent again :data:`RESEND_S` later (in the
    main thread; elsewhere signals cannot be handled, and the block runs as it is)."""
    if not _in_main_thread():
        yield
        return
    handler = _RaiseOutsideImports()
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        handler.cancel()
        for signum, handler_before in previous.items():
            if handler_before is not None:  # None: installed outside Python, not restorable
                signal.signal(signum, handler_before)


class InterruptFlag:
    """Ctrl-C and SIGTERM as a flag the training loop reads between steps: ``raised`` once one
    came, ``signum`` which. A second signal stops at once (``KeyboardInterrupt`` or
    :class:`Terminated`)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def raised(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "InterruptFlag":
        if _in_main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised:
            _raise_for(signum)
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous = {}
