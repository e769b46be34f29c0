"""One exception type for every problem a user can fix.

The CLI prints a `MonoscopeError` as a single line (no traceback) and exits non-zero, so every
message must name the offending value and say what to do about it.
"""

from __future__ import annotations


class MonoscopeError(Exception):
    """A problem with the user's input, files or environment, explained in one line."""


class StoreError(MonoscopeError):
    """An activation store is missing, corrupt, incomplete or not the one the caller expected."""


class CorpusError(MonoscopeError):
    """A corpus is missing, empty, too short or malformed."""


class ModelError(MonoscopeError):
    """A model cannot be loaded, or a hook point does not exist on it."""
