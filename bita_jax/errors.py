"""Errors that describe bad input rather than a bug: the CLIs report them as one `error: ...` line."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem (bad option, unsupported model, mismatched adapter, ...)."""


class UserError(ConfigError):
    """Bad input from the user (missing file, malformed data line, ...)."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT/SIGTERM after saving its work; the message says where it is."""


class PromptError(ConfigError):
    """A prompt that cannot be decoded; `index` is its position in the list given, `reason` what is
    wrong, so a CLI can name the prompt by its own terms (a file's line)."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"prompts[{index}] {reason}")
        self.index = index
        self.reason = reason
