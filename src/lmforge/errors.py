"""User-facing errors.

Anything a user can cause (a bad path, a config typo, a corrupted checkpoint) raises a subclass of
LmforgeError with a one-line message naming the problem and the fix. The CLI prints it without a traceback
and exits non-zero; anything else is a bug and keeps its traceback.
"""


class LmforgeError(Exception):
    """A problem the user can fix; the message says how."""


class ConfigError(LmforgeError):
    """An invalid, unknown or inconsistent configuration value."""


class DataError(LmforgeError):
    """A corpus, tokenizer or shard that is missing, empty, stale or corrupted."""


class CheckpointError(LmforgeError):
    """A checkpoint that is missing, corrupted or does not fit the model."""


class UsageError(LmforgeError):
    """A command line that does not parse or misses an argument."""
