"""The walls: every private name of a dependency that quadstep uses, one module per dependency.

:mod:`quadstep._internals.torch` holds torch's underscore-private names, :mod:`quadstep._internals.backpack`
BackPACK's deep modules and conventions (``input0``/``output``, saved quantities, error texts). Each checks
once at import that what it needs exists; with versions other than the tested ones a missing name leads
to the plain (slower) path or to a clear error naming the tested versions, never to a crash deep inside.
"""

from __future__ import annotations

#: The versions the walls were written and tested against.
TESTED_TORCH = "2.13"
TESTED_BACKPACK = "1.7.1"


def untested(what: str) -> str:
    """An error message for ``what`` is missing, naming the installed and the tested versions."""
    import importlib.metadata

    import torch

    try:
        backpack = importlib.metadata.version("backpack-for-pytorch")
    except importlib.metadata.PackageNotFoundError:
        backpack = "not installed"
    return (
        f"quadstep needs {what}, which the installed versions (torch {torch.__version__}, BackPACK "
        f"{backpack}) lack; quadstep was tested with torch {TESTED_TORCH} and BackPACK {TESTED_BACKPACK}. "
        "Install those versions, or use the options that do not need it."
    )
