"""Errors that carry a message a clinician can act on."""


class BrainUNetError(Exception):
    """Base class: str(error) is a complete, actionable one-line message."""


class InputError(BrainUNetError):
    """An input image or path is unusable (missing, corrupt, wrong shape, NaN, ...)."""


class NoSequenceFound(InputError):
    """A folder holds no series or image named as T1CE, T2W or FLAIR."""


class WeightsError(BrainUNetError):
    """A model weights file is missing, corrupt or does not match its checksum."""


class Cancelled(BrainUNetError):
    """The user cancelled the run."""

    def __init__(self, message: str = "Cancelled by the user; nothing was changed."):
        super().__init__(message)
