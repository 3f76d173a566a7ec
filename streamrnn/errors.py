"""One root exception for the library, so callers (CLI, daemon) can tell user mistakes
from bugs and print a message instead of a traceback."""


class StreamrnnError(ValueError):
    """A problem with the user's input: a bad file, argument or configuration."""


class ModelFileError(StreamrnnError):
    """A model file that cannot be loaded: not a model, truncated, inconsistent or unsafe."""
