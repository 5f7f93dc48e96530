"""The one error root of detkit.

Every error a user can fix (a config key, a dataset file, a checkpoint, a proposal file, a
training run that cannot go on, a command-line argument) is a ``DetkitError``: its message
is one line that names the file, key or value at fault. The command line catches this one
type and prints that line (exit status 2); anything else is a bug and keeps its traceback.

The subclasses only say which part of detkit noticed the problem. Several also derive from
``ValueError`` (as before this module existed) so that callers that caught ValueError keep
working.
"""

from __future__ import annotations


class DetkitError(Exception):
    """Base of every user-fixable error; ``str(exc)`` is one line (newlines are folded)."""

    def __init__(self, message: object = ""):
        super().__init__(" ".join(str(message).split()))


class UsageError(DetkitError):
    """A command-line argument that cannot work (missing file, contradicting options)."""


class ConfigError(DetkitError, ValueError):
    """A config key, value or file that is wrong; the message names key and file."""


class DatasetError(DetkitError):
    """A dataset that cannot be used at all; the message names the file."""


class ImageReadError(DetkitError):
    """An image that is missing or cannot be decoded; the message names the file."""


class CheckpointError(DetkitError):
    """A checkpoint that cannot be read or does not fit the model."""


class TrainingError(DetkitError, RuntimeError):
    """Training cannot go on (non-finite loss, a run folder in the way, ...)."""


class DetectionFileError(DetkitError, ValueError):
    """A detection file (COCO-style results list) that cannot be read or does not fit."""


class BackboneError(DetkitError, ValueError):
    """A backbone option that cannot work (unknown name, weights that do not fit, ...)."""


class ProposalFileError(DetkitError):
    """A proposal file that cannot be read or written; names the file and the fault."""


class SelectiveSearchError(DetkitError, ValueError):
    """Selective Search cannot run on this input (bad image, unknown mode or similarity)."""


class ExportError(DetkitError):
    """A model or head that cannot be exported / compressed as asked."""


class FeatureCacheError(DetkitError):
    """A feature cache (R-CNN / SPP-net's offline stages) that is corrupt or was made for
    another config or model; names the folder or file."""


class DistributedError(DetkitError, RuntimeError):
    """A distributed run (torchrun) that cannot start or go on: a launch variable missing,
    a backend that does not fit the device, another rank that failed or was lost."""
