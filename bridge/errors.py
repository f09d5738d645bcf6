"""User-facing errors.

Why a dedicated type: bad input (a missing file, a greyscale image, a CSV with
a non-numeric coordinate) is the user's to fix, not a bug.  The CLI prints
``str(err)`` and exits non-zero without a traceback, and the gRPC layer maps it
to ``INVALID_ARGUMENT``; anything else is an internal error.
"""

from __future__ import annotations


class BridgeInputError(ValueError):
    """Bad user input; ``str()`` is one readable line that names the culprit."""

    def __init__(self, message: str) -> None:
        # One line, always: the CLI and gRPC status details show it verbatim.
        super().__init__(" ".join(str(message).split()))
