"""The first check of a user's ``.npz``: does the file start as a zip archive at all?

numpy reads any file that is not a zip archive as a pickle, so with ``allow_pickle=False`` a text
file named ``.npz`` is refused as "pickled (object) data": true of the parser, misleading to the
person who saved it. The readers ask this first and say what the file is not.
"""

from __future__ import annotations

import os

__all__ = ["ZIP_SIGNATURES", "zip_signature_problem"]

# The first bytes of every .npz: a zip archive's local-file header (or, empty, its end record).
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
# What np.save writes first: a .npy saved under an .npz name.
NPY_MAGIC = b"\x93NUMPY"


def zip_signature_problem(path: str | os.PathLike) -> str | None:
    """``None`` when ``path`` starts like a zip archive; otherwise why it is not an ``.npz``:
    ``"not an npz (zip) file"`` (``"... (it is empty)"``), ``"a single .npy array, ..."``, or
    ``"cannot read (...)"``."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as error:
        return f"cannot read ({error.strerror})"
    if head in ZIP_SIGNATURES:
        return None
    if head == NPY_MAGIC[:4]:
        return "a single .npy array, not an npz (zip) archive"
    return "not an npz (zip) file" + (" (it is empty)" if not head else "")
