"""streamrnn: streaming anomaly detection with recurrent networks compiled by Numba."""

__version__ = "0.1.0"

from streamrnn.errors import ModelFileError, StreamrnnError  # noqa: E402
from streamrnn.model import Model  # noqa: E402

__all__ = ["Model", "ModelFileError", "StreamrnnError", "__version__"]
