"""What keeps a run directory and a user's files safe: the data's identity, the lock a training
process holds, the state a run left behind, output checks and atomic writes, and recovery from an
unreadable ``best.pt``.

- **Identity.** ``config.json`` records the sha256 of the data file and a digest of the arrays
  themselves (:func:`arrays_sha256`, the same for in-memory data); :func:`check_same_data`
  refuses a resume on other data, naming both digests, before anything is rewritten.
- **Lock.** :func:`lock_run` holds an exclusive ``flock`` on ``RUN_DIR/train.lock`` while a
  process trains there; the kernel drops it when the process exits or dies, so a lock is never
  stale, and a second process is refused at once (:class:`RunLockedError`).
- **Left behind.** :func:`run_contents` tells a directory that holds a trained run from one a run
  left before its first checkpoint (killed, interrupted early, a non-finite first batch), which a
  fresh ``train`` may clear (:func:`start_over`), and from one holding anything else.
- **Outputs.** :func:`check_output_file` / :func:`check_output_dir` refuse an existing file
  (without ``force``), a directory named as a file, a file named as a directory, and a place
  that cannot be written, before any work; :func:`atomic_write` (:func:`atomic_write_path` for
  writers that need a file name) leaves either the old file or the new one and never a
  temporary one, and every figure is written through it (:func:`save_figure`).
- **Recovery.** :func:`load_best_or_last` falls back to ``checkpoint.pt`` when ``best.pt`` (and
  its ``.prev``) are unreadable, with a one-line warning.

Every refusal is a ``ValueError`` whose message is one line naming the bad value.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

try:  # POSIX; elsewhere training runs unlocked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CONFIG_NAME",
    "LOCK_NAME",
    "REQUIRED_KEYS",
    "RunContents",
    "RunLockedError",
    "arrays_sha256",
    "atomic_write",
    "atomic_write_path",
    "check_output_dir",
    "check_output_file",
    "check_device",
    "check_same_data",
    "check_writable_dir",
    "file_sha256",
    "load_best_or_last",
    "load_module_state",
    "lock_run",
    "read_json",
    "read_run_record",
    "run_contents",
    "save_figure",
    "start_over",
    "write_text_atomic",
]

CONFIG_NAME = "config.json"
LOCK_NAME = "train.lock"
# What reading a run needs from config.json (evaluate, generate, report, --init-from, resume);
# newer keys have defaults, so runs written before them still load.
REQUIRED_KEYS = {
    "config": ("flow", "flow_length", "latent_dim", "hidden_dim", "batch_size", "lr", "seed",
               "device"),
    "model": ("input_dim", "latent_dim", "hidden_dim"),
    "data": ("path", "sha256", "n_steps", "input_dim"),
}
# The arrays of a SequenceData that make its identity (None ones are skipped).
_DATA_FIELDS = ("x", "mask", "x_test", "mask_test", "x_valid", "mask_valid")


class RunLockedError(ValueError):
    """Another process is training in the run directory."""


# ----------------------------------------------------------------------------- identity


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def arrays_sha256(data: Any) -> str:
    """A digest of the data's arrays (name, dtype, shape, bytes): equal for the same sequences
    however they were stored or built, different when any value, split or mask differs."""
    digest = hashlib.sha256()
    for name in _DATA_FIELDS:
        array = getattr(data, name, None)
        if array is None:
            continue
        array = np.ascontiguousarray(array)
        digest.update(f"{name}:{array.dtype.str}:{array.shape}:".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def check_same_data(stored: dict[str, Any], data: Any, data_path: str | os.PathLike | None,
                    run_dir: str | os.PathLike) -> None:
    """``ValueError`` naming both digests when ``data`` are not the data ``stored`` (a run
    record's ``"data"``) describes. The arrays' digest decides when the run recorded one (a run
    from before it: the file's sha256, else the sizes)."""
    where = f"--resume {str(run_dir)!r}"
    if stored.get("arrays_sha256") is not None:
        new = arrays_sha256(data)
        if new != stored["arrays_sha256"]:
            raise ValueError(f"{where}: the run was trained on other data (arrays sha256 "
                             f"{stored['arrays_sha256']}), these data have {new}; resume on the "
                             f"run's data ({stored.get('path')}) or train into a new --out")
        return
    if stored.get("sha256") is not None and data_path is not None:
        new = file_sha256(data_path)
        if new != stored["sha256"]:
            raise ValueError(f"{where}: the run was trained on other data (file sha256 "
                             f"{stored['sha256']}), {str(data_path)!r} has {new}; resume on the "
                             f"run's data ({stored.get('path')}) or train into a new --out")
    sizes = {"input_dim": int(data.x.shape[-1]), "n_steps": int(data.x.shape[1])}
    for key, value in sizes.items():
        if key in stored and stored[key] != value:
            raise ValueError(f"{where}: the run was trained on data with {key} {stored[key]}, "
                             f"these data have {value}")


# ----------------------------------------------------------------------------- config.json


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``; ``ValueError`` naming the file (unreadable, not JSON)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ValueError(f"{path}: cannot read ({reason})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def read_run_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``run_dir``'s ``config.json``, with the keys reading a run needs (:data:`REQUIRED_KEYS`);
    ``ValueError`` naming the file and the first missing key."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_NAME
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{str(run_dir)!r} is not a run directory (it is a file)")
    if not path.is_file():
        raise ValueError(f"{str(run_dir)!r} is not a run directory (no {CONFIG_NAME})")
    record = read_json(path)
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}")
    for section, keys in REQUIRED_KEYS.items():
        values = record.get(section)
        if not isinstance(values, dict):
            raise ValueError(f"{path}: missing key {section} (an object)")
        missing = [key for key in keys if key not in values]
        if missing:
            raise ValueError(f"{path}: missing key {section}.{missing[0]}")
    return record


# ----------------------------------------------------------------------------- lock

# run directory (resolved) -> [fd, depth]: the lock is re-entrant within one process.
_held: dict[str, list[int]] = {}


@contextlib.contextmanager
def lock_run(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the run directory's lock for the ``with`` block: :class:`RunLockedError` at once when
    another process holds it. The directory and ``train.lock`` are created here and removed at
    the end (the directory only when this call created it and it is still empty, e.g. after a
    refusal), so a finished or refused run leaves no trace of the lock; a killed one leaves an
    unlocked ``train.lock``, which the next run takes over."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:  # re-entrant: the CLI holds it around runs.train, which takes it too
        _held[key][1] += 1
        try:
            yield run_dir
        finally:
            _held[key][1] -= 1
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunLockedError(f"run directory {str(run_dir)!r} is in use: another process is "
                                 f"training in it ({LOCK_NAME} is locked)") from None
        warnings.warn(f"cannot lock {lock_path} ({error.strerror}); training without a lock",
                      stacklevel=3)
        fd = -1
    _held[key] = [fd, 1]
    try:
        yield run_dir
    finally:
        del _held[key]
        # Unlinked while still held: a process that opened it meanwhile is refused (LOCK_NB)
        # rather than left holding a lock on a file nobody else can find.
        with contextlib.suppress(OSError):
            lock_path.unlink()
        if fd >= 0:
            os.close(fd)  # closing the only descriptor releases the flock
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only when empty: nothing was written


# ----------------------------------------------------------------------------- contents


@dataclass(frozen=True)
class RunContents:
    """What a directory holds, as a run directory: ``trained`` when it has a checkpoint;
    ``partial`` the files a run leaves before its first checkpoint; ``other`` anything else."""

    trained: bool
    partial: tuple[str, ...]
    other: tuple[str, ...]

    @property
    def empty(self) -> bool:
        """Nothing, or only the lock file of a process that died before writing anything."""
        return not (self.trained or self.other or set(self.partial) - {LOCK_NAME})

    @property
    def left_before_checkpoint(self) -> bool:
        """Only what a run that stopped before its first checkpoint leaves."""
        return not self.trained and not self.other and bool(set(self.partial) - {LOCK_NAME})


def _partial_names() -> set[str]:
    from .training import BEST_NAME, CHECKPOINT_NAME, METRICS_NAME

    return {CONFIG_NAME, METRICS_NAME, METRICS_NAME + ".tmp", CHECKPOINT_NAME + ".tmp",
            BEST_NAME, BEST_NAME + ".prev", BEST_NAME + ".tmp", LOCK_NAME,
            CONFIG_NAME + ".tmp"}


def run_contents(run_dir: str | os.PathLike) -> RunContents:
    from .training import CHECKPOINT_NAME

    run_dir = Path(run_dir)
    names = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    trained = CHECKPOINT_NAME in names or CHECKPOINT_NAME + ".prev" in names
    partial_names = _partial_names()
    partial = tuple(n for n in names if n in partial_names and (run_dir / n).is_file())
    other = tuple(n for n in names if n not in partial and n not in (CHECKPOINT_NAME,
                                                                      CHECKPOINT_NAME + ".prev"))
    return RunContents(trained=trained, partial=partial, other=other)


def start_over(run_dir: str | os.PathLike, contents: RunContents) -> list[str]:
    """Remove what a run left before its first checkpoint (not the lock); the names removed."""
    removed = [name for name in contents.partial if name != LOCK_NAME]
    for name in removed:
        (Path(run_dir) / name).unlink(missing_ok=True)
    return removed


# ----------------------------------------------------------------------------- resources


def check_device(device: str, what: str = "device") -> None:
    """``ValueError`` naming ``device`` unless it is ``cpu`` or ``cuda[:N]`` and present."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} must be cpu or cuda (or cuda:N), got {device!r}")
    if parsed.type == "cpu" and parsed.index not in (None, 0):
        raise ValueError(f"{what} must be cpu or cuda (or cuda:N), got {device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {device!r} requested but CUDA is not available")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{what} {device!r}: there are {torch.cuda.device_count()} CUDA "
                             "device(s)")


# ----------------------------------------------------------------------------- outputs


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(directory: str | os.PathLike, what: str) -> None:
    """``ValueError`` unless ``directory`` (or, when it does not exist yet, the nearest directory
    above it, where it would be created) is a directory this process can write."""
    directory = Path(directory)
    existing = _nearest_existing(directory)
    if not existing.is_dir():
        raise ValueError(f"{what} {str(directory)!r}: {str(existing)!r} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {str(directory)!r}: directory {str(existing)!r} is not "
                         "writable")


def check_output_file(path: str | os.PathLike, what: str, *, force: bool = False) -> None:
    """``ValueError`` when writing ``path`` would replace a file without ``force``, when it names
    a directory, or when its directory cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory, not a file")
    if path.exists() and not force:
        raise ValueError(f"{what} {str(path)!r} exists; use --force to replace it")
    check_writable_dir(path.parent, f"{what} {str(path)!r}: its directory")


def check_output_dir(directory: str | os.PathLike, what: str, names: Sequence[str] = (), *,
                     force: bool = False) -> None:
    """``ValueError`` when ``directory`` is a file, cannot be written, or already holds one of
    ``names`` (the files that would be written) without ``force``."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{what} {str(directory)!r} exists and is not a directory")
    check_writable_dir(directory, what)
    for name in names:
        target = directory / name
        if target.is_dir():
            raise ValueError(f"{what}: {str(target)!r} is a directory, not a file")
        if target.exists() and not force:
            raise ValueError(f"{what}: {str(target)!r} exists; use --force to replace it")


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """``write(handle)`` into a temporary file beside ``path``, then rename it into place: a
    reader sees the old file or the new one, and a failure (or Ctrl-C) leaves no temporary."""

    def write_file(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            write(handle)

    return atomic_write_path(path, write_file, suffix=".tmp")


def atomic_write_path(path: str | os.PathLike, write: Callable[[Path], None], *,
                      suffix: str | None = None) -> Path:
    """:func:`atomic_write` for writers that open the file themselves (ArviZ's netCDF writer
    opens it once per group): ``write(tmp)`` writes a temporary path beside ``path``, ending in
    ``suffix`` (default ``.tmp`` + ``path``'s suffix, for writers that go by it), which is then
    renamed into place."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory, not a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp{path.suffix}" if suffix is None else suffix
    # Not tempfile.mkstemp: its name is known only once the file exists, and a Ctrl-C in between
    # would leave a temporary that nothing removes. Here the name is ours before the file is.
    tmp: str | None = None
    try:
        while tmp is None:
            tmp = str(path.parent / f".{path.name}.{os.urandom(6).hex()}{suffix}")
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:  # another writer's (48 random bits): not ours to remove
                tmp = None
        write(Path(tmp))
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode()))


def save_figure(fig: Any, path: str | os.PathLike, **savefig: Any) -> Path:
    """``fig.savefig(path, **savefig)`` through :func:`atomic_write`: a kill or an error while
    matplotlib writes leaves the old figure or none, never a torn PNG or PDF. The format is the
    file name's (``format=`` overrides; no suffix: matplotlib's default)."""
    path = Path(path)
    savefig.setdefault("format", path.suffix.lstrip(".") or None)
    return atomic_write(path, lambda handle: fig.savefig(handle, **savefig))


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)  # Linux and macOS flush a file through any descriptor
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- recovery


def load_module_state(module: Any, state_dict: dict[str, Any], source: str | os.PathLike) -> None:
    """``module.load_state_dict(state_dict)``; a checkpoint of a model of another size (or
    another kind) is a ``ValueError`` naming the file and the first parameter that differs."""
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as error:
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        first = details[0] if details else str(error).splitlines()[0]
        raise ValueError(f"{source}: its state does not fit the model of the run's "
                         f"{CONFIG_NAME} ({first.rstrip('.')})") from None


def load_best_or_last(best: Path, last: Path, prefer_best: bool) -> tuple[dict[str, Any], str]:
    """``(payload, "best" | "last")``: ``best`` when preferred and readable (or its ``.prev``),
    else ``last`` with a one-line warning saying why."""
    from .checkpoint import CheckpointError, load_checkpoint

    if prefer_best:
        try:
            return load_checkpoint(best, map_location="cpu"), "best"
        except CheckpointError as error:
            warnings.warn(f"{error}; using the last state {last} instead", stacklevel=3)
    return load_checkpoint(last, map_location="cpu"), "last"
