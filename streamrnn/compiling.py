"""Saying so when Numba compiles: on a cold cache the first start of a command spends a
minute or more compiling kernels with nothing else to show for it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["on_first_compile", "compiling_message", "CompileClock", "compile_clock"]


@contextmanager
def on_first_compile(callback: Callable[[], None]) -> Iterator[None]:
    """Call ``callback()`` once, when the first kernel that Numba's on-disk cache did not
    hold starts compiling inside the block (a kernel loaded from the cache calls nothing)."""
    from numba.core import event

    class _First(event.Listener):
        fired = False

        def on_start(self, ev) -> None:
            if not self.fired:
                self.fired = True
                callback()

        def on_end(self, ev) -> None:
            pass

    with event.install_listener("numba:compile", _First()):
        yield


class CompileClock:
    """Seconds Numba spent compiling inside a :func:`compile_clock` block, so far."""

    def __init__(self, listener) -> None:
        self._listener = listener

    @property
    def seconds(self) -> float:
        return self._listener.duration if self._listener.done else 0.0


@contextmanager
def compile_clock() -> Iterator[CompileClock]:
    """Measure the compiling inside the block (outermost compiles only: a kernel's callees
    compile within it), so a rate can leave out a cold cache's first-run minutes."""
    from numba.core import event

    listener = event.TimingListener()
    with event.install_listener("numba:compile", listener):
        yield CompileClock(listener)


def compiling_message(what: str, seconds: str) -> str:
    """The line that says ``what`` is being compiled, for about ``seconds``, and whether a
    later start will load it from the cache."""
    import numba

    from streamrnn import config

    if not config.CACHE:
        return f"compiling {what} (about {seconds}); STREAMRNN_CACHE=0 keeps no cache, so every run compiles them"
    where = numba.config.CACHE_DIR or "__pycache__ beside the package"
    return (f"compiling {what} for this model and machine (about {seconds}): only the first time, "
            f"later runs load them from the Numba cache ({where})")
