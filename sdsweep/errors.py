"""The errors a user can fix. A leaf module: everything may import it, it imports nothing of ours."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is impossible. The message names the key and the fix."""


class SweepStopped(RuntimeError):
    """The sweep cannot go on (the baseline failed, the study changed under it); the message says why.
    Finished trials are kept; the command line prints it as one line, with no traceback, and exits with
    ``exit_code`` (2 when the user's input changed, as for a ConfigError; 1 otherwise)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


__all__ = ["ConfigError", "SweepStopped"]
