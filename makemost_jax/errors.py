"""Exceptions raised for bad user input.

Every error the library raises on purpose derives from :class:`MakemostError`, so the
CLI can print it as one line (and exit non-zero) instead of a traceback. Each message
names the offending input and says how to fix it.

Example:
    >>> from makemost_jax.errors import ConfigError
    >>> try:
    ...     raise ConfigError("stride=0 must be positive; pass --stride 256")
    ... except MakemostError as e:
    ...     print(e)
    stride=0 must be positive; pass --stride 256
"""


class MakemostError(Exception):
    """Base class of every deliberate makemost_jax error."""


class ModelNotFoundError(MakemostError):
    """The model name or path does not exist or cannot be resolved offline."""


class CheckpointError(MakemostError):
    """A checkpoint is corrupted, incomplete or does not match its config."""


class ConfigError(MakemostError):
    """Settings that make no sense (window/stride, lengths, dtypes, sampling knobs)."""


class InputError(MakemostError):
    """Bad inputs to a model call: empty text, wrong shapes, too long for the context."""
