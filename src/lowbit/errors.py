"""The errors a lowbit user is meant to catch.

Every message names the field (or file), the value that was given, and what is allowed, so that the
fix can be read off the message without a traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration, recipe, rule or argument is invalid."""


class DatasetMissingError(ConfigError):
    """A dataset is not installed; the message says how to install it."""


class FormatError(ValueError):
    """A file (checkpoint or exported model) is malformed, truncated or tampered with."""


class TrainingError(RuntimeError):
    """Training cannot go on (for example a non-finite loss); the last good checkpoint is kept."""
