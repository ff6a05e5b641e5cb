"""Typed errors the runtime raises for bad input.

Every check on user input raises one of these with a message a person can act on, so the CLI and the
app can show one line instead of a traceback from deep inside torch.
"""


class AdaptiveError(Exception):
    """Base class of every error the runtime raises on purpose."""


class InvalidRequestError(AdaptiveError, ValueError):
    """A generate() argument is out of range: empty prompt, bad knob, unknown mode or measure."""


class ContextLengthError(InvalidRequestError):
    """The prompt, or prompt plus requested tokens, does not fit in the model's context."""


class UnsupportedModelError(AdaptiveError):
    """The checkpoint's architecture is not one the lean forward implements."""


class CheckpointError(AdaptiveError):
    """A checkpoint directory, weights file or adapter file is missing or corrupt."""


class TraceFormatError(AdaptiveError, ValueError):
    """A JSON trace file does not parse or does not match the trace schema."""
