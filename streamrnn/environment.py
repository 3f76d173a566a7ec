"""The ``STREAMRNN_*`` environment variables, and a warning for those nothing reads.

Kept apart from :mod:`streamrnn.config` (which imports Numba) so the command line can check
the environment before any command without paying for that import.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

__all__ = ["PREFIX", "COMPILE_OPTIONS", "unknown_env_messages"]

PREFIX = "STREAMRNN_"
#: The compile options read at import by streamrnn.config (and STREAMRNN_SPLIT by kernels/split.py).
COMPILE_OPTIONS = ("STREAMRNN_FASTMATH", "STREAMRNN_PARALLEL", "STREAMRNN_CACHE", "STREAMRNN_PANEL",
                   "STREAMRNN_SPLIT")


def unknown_env_messages(env: Mapping[str, str], known: Iterable[str]) -> list[str]:
    """A line for each ``STREAMRNN_*`` variable of ``env`` outside ``known`` and the compile
    options: nothing reads it, so a misspelt name would silently leave its setting at the
    default. Each line names the close matches."""
    known = set(known) | set(COMPILE_OPTIONS)
    suffixes = sorted(k[len(PREFIX):] for k in known)
    lines = []
    for name in sorted(k for k in env if k.startswith(PREFIX) and k not in known):
        # Matched without the common prefix, which would make every name look close.
        near = [PREFIX + m for m in difflib.get_close_matches(name[len(PREFIX):], suffixes, n=3)]
        hint = (f"did you mean {' or '.join(near)}?" if near else
                f"streamrnn reads {', '.join(COMPILE_OPTIONS)} and STREAMRNN_<daemon setting> "
                f"(a key of deploy/daemon.toml in upper case)")
        lines.append(f"environment variable {name} is not a streamrnn setting and is ignored; {hint}")
    return lines
