"""pyro-storn: STORN, a flow VAE and flow densities whose guides use the `transforms` flows."""

from __future__ import annotations

from typing import Any

__all__ = ["STORN", "VAE"]

__version__ = "0.1.0"

# Imported on first use, so that `pyro-storn` (pyro_storn.cli) starts without torch and its own
# handler sees a Ctrl-C that arrives while torch is being imported.
_LAZY = {"STORN": ".storn", "VAE": ".vae"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
