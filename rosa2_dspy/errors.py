"""Errors raised by rosa2-dspy. Each message says what the user can do about it."""

from __future__ import annotations


class Rosa2Error(Exception):
    """Base class of every error this library raises on purpose."""


class ModelPackageMissingError(Rosa2Error):
    """The package that ships the embedded default model is not installed."""


class AdapterLoadError(Rosa2Error):
    """A saved adapter is corrupt, incomplete or does not fit the loaded model."""


class FeedbackError(Rosa2Error):
    """A feedback source returned something that is not a score plus a feedback text."""


class TurnFailedError(Rosa2Error):
    """The words or weights step failed inside adapt(); the session is as it was and the turn awaits feedback."""
