"""Exceptions raised by clipadapt.

Every error meant for a user derives from :class:`ClipadaptError`; the command line prints its
message on one line and exits with code 2. Messages name the culprit (file, tensor, option) and
the fix.
"""

from __future__ import annotations


class ClipadaptError(Exception):
    """Base class of every user-facing clipadapt error."""


class ConfigError(ClipadaptError, ValueError):
    """A flag, option or configuration value is invalid."""


class DatasetError(ClipadaptError, ValueError):
    """A dataset root, split file, image or description file is missing or malformed."""


class BundleError(ClipadaptError, ValueError):
    """A feature bundle is malformed (wrong shape, dtype, non-finite values...)."""


class MissingTensorError(BundleError, KeyError):
    """A method needs a bundle tensor that the bundle does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownMethodError(ClipadaptError, KeyError):
    """A method name is not registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotFittedError(ClipadaptError, ValueError, AttributeError):
    """A method was used before :meth:`fit`."""


class TrainingError(ClipadaptError, RuntimeError):
    """Training diverged (non-finite loss) or a solver failed; the message names the option."""


class CheckpointError(ClipadaptError, ValueError):
    """A checkpoint or saved adapter cannot be read safely."""
