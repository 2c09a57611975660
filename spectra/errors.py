"""User-facing errors: one paragraph that says what was wrong and what to do."""

from __future__ import annotations


class SpectraError(Exception):
    """An error caused by the user's input or environment, reported without a traceback.

    The message must say what was wrong and what to do about it; the CLI prints it as-is and exits
    with ``exit_code`` (2: bad input or environment).
    """

    exit_code: int = 2


class RunInterrupted(SpectraError):
    """A run stopped by SIGTERM or SIGINT between two writes; the message says how far it got and how to resume."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        #: the shell's convention for a process ended by a signal
        self.exit_code = 128 + signum
