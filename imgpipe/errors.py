"""Named exceptions, split into permanent (bad input, bad config) and retryable (infrastructure)."""

from __future__ import annotations


class ImgpipeError(Exception):
    """Base class of every error imgpipe raises on purpose."""


class ConfigError(ImgpipeError):
    """A setting, flag or file the user gave is wrong; the CLI prints one line and exits 2."""


class ModelFileError(ConfigError):
    """The model file is missing, not TorchScript, or lacks imgpipe metadata."""


class ImageError(ImgpipeError):
    """One input image cannot be classified; it becomes an error record, never a crash.

    ``reason`` is a short, bounded token used as a metric label (never a path).
    """

    REASONS = (
        "not_found",
        "not_allowed",
        "not_regular",
        "unreadable",
        "empty",
        "too_large",
        "too_many_pixels",
        "decode",
        "dead_letter",
        "internal",
    )

    def __init__(self, reason: str, message: str) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown image error reason {reason!r}; valid: {', '.join(self.REASONS)}")
        super().__init__(message)
        self.reason = reason
        self.message = message


class RetryableError(ImgpipeError):
    """A transient failure (Redis down, device busy): the message should be redelivered."""
