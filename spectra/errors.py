"""User-facing errors: one paragraph that says what was wrong and what to do."""

from __future__ import annotations


class SpectraError(Exception):
    """An error caused by the user's input or environment, reported without a traceback.

    The message must say what was wrong and what to do about it; the CLI prints it as-is.
    """
