import os

# Tests compile the kernels once and reuse them from disk across processes and runs.
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".numba_cache"))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def kafka_broker():
    """One development broker (Tansu on a free loopback port) for the whole session, started
    by the same code as ``streamrnn broker``; tests use unique topic names."""
    from daemon.broker import start_broker

    with start_broker() as broker:
        yield broker
