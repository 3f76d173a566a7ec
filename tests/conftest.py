import os

# Tests compile the kernels once and reuse them from disk across processes and runs.
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".numba_cache"))
