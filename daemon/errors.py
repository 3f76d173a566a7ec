"""Errors of the Kafka daemon: user mistakes (configuration, flags, an unreachable broker)
are :class:`DaemonError`, printed as one line without a traceback by the CLI."""

from streamrnn.errors import StreamrnnError


class DaemonError(StreamrnnError):
    """A configuration or environment problem the user can fix."""


class ConfigError(DaemonError):
    """A bad setting in the TOML file, an environment variable or a flag."""
