"""Project exceptions.

Every error a user can cause derives from MultiTurnSegError. Messages say what
was wrong and what is allowed, in words a radiologist can act on; the CLI
prints them without a traceback and the Slicer panel shows them as they are.
"""


class MultiTurnSegError(Exception):
    """Base class of all errors MultiTurnSeg reports to a user."""


class InputError(MultiTurnSegError, ValueError):
    """Bad input from the user: a file, an axis, an index, a prompt, a preset."""


class VolumeError(InputError):
    """A volume that cannot be read or is not a scalar 3D image."""


class ReferenceResolutionError(InputError):
    """A prompt refers to a round or segment that does not exist, or is ambiguous."""


class ConversationFormatError(InputError):
    """A saved conversation (JSON) that is malformed or of an unknown version."""


class ModelLoadError(MultiTurnSegError):
    """A model description or checkpoint that cannot be loaded as it is."""


class InferenceError(MultiTurnSegError):
    """The model failed on a turn (out of memory, device problems, ...)."""


class BackendError(MultiTurnSegError):
    """A backend (e.g. the remote worker) could not answer."""


class ExportError(MultiTurnSegError):
    """A segmentation could not be exported (e.g. to DICOM-SEG)."""
