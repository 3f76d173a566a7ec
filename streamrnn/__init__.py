"""streamrnn: streaming anomaly detection with recurrent networks compiled by Numba."""

__version__ = "0.1.0"

from streamrnn.errors import ModelFileError, StreamrnnError  # noqa: E402
from streamrnn.model import Model  # noqa: E402

__all__ = ["Detector", "Model", "ModelFileError", "StreamTable", "StreamrnnError", "__version__"]

# The public names of the core engine; Detector and StreamTable load on first use (PEP 562),
# so `import streamrnn` stays cheap for the CLI and the trainer.
_LAZY = {"Detector": "streamrnn.detector", "StreamTable": "streamrnn.state"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'streamrnn' has no attribute {name!r}")
