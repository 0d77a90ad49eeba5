"""The errors a user can fix. A leaf module: everything may import it, it imports nothing of ours."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is impossible. The message names the key and the fix."""


__all__ = ["ConfigError"]
