"""Numba compilation options, in one place (kernels never hard-code them).

Every option can be overridden by an environment variable before import, e.g.
``STREAMRNN_FASTMATH=0`` to compile strict IEEE kernels while debugging.

Numba's on-disk cache keys a compiled kernel by its own file's source and its argument
types only: not by the compile options, and not by the other files whose functions it
inlined. Left alone, a kernel compiled with other options, or before a kernel it calls was
edited, would be loaded silently. So this module installs a cache locator for streamrnn's
files (:class:`KernelCacheLocator`) that keeps each option set in its own cache directory
and invalidates a cached kernel whenever its module or any streamrnn module it uses
(transitively: the modules of the functions it imports) changes.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in {"0", "false", "no", "off", ""}


#: Fast-math flags for the kernels. "contract" lets LLVM fuse multiply-add (FMA) and the
#: others drop NaN/inf/signed-zero bookkeeping. "reassoc" is left out on purpose: it would let
#: the compiler reorder sums differently in differently shaped loops, and then a stream's
#: result could depend on how its events were batched.
FASTMATH: set[str] | bool = (
    {"contract", "arcp", "nsz", "afn"} if _flag("STREAMRNN_FASTMATH", True) else False
)

#: Parallelise over streams with ``prange``.
PARALLEL: bool = _flag("STREAMRNN_PARALLEL", True)

#: Keep compiled kernels on disk (NUMBA_CACHE_DIR decides where).
CACHE: bool = _flag("STREAMRNN_CACHE", True)

#: NumPy error model: no per-division zero checks, so inner loops vectorise.
ERROR_MODEL: str = "numpy"



def _host_has_avx512() -> bool:
    try:
        from llvmlite import binding

        return bool(binding.get_host_cpu_features().get("avx512f"))
    except Exception:  # an unknown host: the narrower tile is safe everywhere
        return False


#: Output columns of one register tile in the step kernels. A tile of 4 rows x PANEL float32
#: accumulators must stay in the 16 vector registers with room for the operands: 32 columns
#: fill 8 512-bit registers with AVX-512; with AVX2 (256-bit) they would take all 16 and
#: spill, so there 16 columns (measured on Zen 3: 4x16 runs at 62-78 GFLOP/s per core, 4x32
#: well below). Results do not depend on it: every output is summed in the same order.
def _panel_width() -> int:
    """The host's tile width, or STREAMRNN_PANEL's; a bad setting warns and keeps the host's."""
    default = 32 if _host_has_avx512() else 16
    text = os.environ.get("STREAMRNN_PANEL")
    if text is None:
        return default
    if text.strip() in ("16", "32"):
        return int(text)
    # Importing the library must not fail on a tuning knob: the width never changes results.
    warnings.warn(f"STREAMRNN_PANEL must be 16 or 32; got {text!r}; using {default}", stacklevel=2)
    return default


PANEL: int = _panel_width()

_PACKAGE = Path(__file__).resolve().parent


def jit_options(parallel: bool = False) -> dict:
    """Keyword arguments for ``numba.njit`` used by every kernel."""
    return {
        "cache": CACHE,
        "fastmath": FASTMATH,
        "error_model": ERROR_MODEL,
        "parallel": PARALLEL and parallel,
        "nogil": True,
    }


def options_tag() -> str:
    """Short name of the compile options in force (one cache directory per option set)."""
    fm = sorted(FASTMATH) if FASTMATH else []
    text = repr((fm, PARALLEL, ERROR_MODEL, PANEL))
    return "opts-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def module_dependencies(module_name: str) -> list[str]:
    """streamrnn modules ``module_name`` uses, itself included, transitively: the modules
    of the functions, kernels and modules in its namespace (sorted names)."""
    seen: set[str] = set()
    todo = [module_name]
    while todo:
        name = todo.pop()
        if name in seen or name not in sys.modules:
            continue
        seen.add(name)
        for value in vars(sys.modules[name]).values():
            dep = value.__name__ if isinstance(value, ModuleType) else getattr(value, "__module__", None)
            if isinstance(dep, str) and dep.split(".")[0] == "streamrnn" and dep not in seen:
                todo.append(dep)
    return sorted(seen)


def sources_digest(module_name: str) -> str:
    """Hash of the source files of ``module_name`` and every streamrnn module it uses: a
    cached kernel may have inlined functions from any of them."""
    h = hashlib.sha256()
    for name in module_dependencies(module_name):
        path = getattr(sys.modules[name], "__file__", None)
        if path:
            h.update(name.encode())
            h.update(Path(path).read_bytes())
    return h.hexdigest()


def _install_cache_locator():
    """Put :class:`KernelCacheLocator` first in Numba's locator list; returns the class."""
    from numba.core import caching

    class KernelCacheLocator(caching._CacheLocator):
        """Numba's own locator for a streamrnn file, with the options in the cache path and
        the kernel sources' digest in the freshness stamp."""

        _digests: dict[str, str] = {}  # per module, hashed once per process

        def __init__(self, inner, module_name):
            self._inner = inner
            self._module = module_name
            # Numba names the file when it warns that a kernel cannot be cached.
            self._py_file = getattr(inner, "_py_file", module_name)

        @classmethod
        def from_function(cls, py_func, py_file):
            try:
                inside = Path(py_file).resolve().is_relative_to(_PACKAGE)
            except (OSError, ValueError):
                return None
            if not inside:
                return None
            for other in caching.CacheImpl._locator_classes:
                if other is not cls:
                    inner = other.from_function(py_func, py_file)
                    if inner is not None:
                        return cls(inner, py_func.__module__)
            return None

        def get_cache_path(self):
            return os.path.join(self._inner.get_cache_path(), options_tag())

        def get_source_stamp(self):
            digests = KernelCacheLocator._digests
            if self._module not in digests:
                digests[self._module] = sources_digest(self._module)
            return (self._inner.get_source_stamp(), digests[self._module])

        def get_disambiguator(self):
            return self._inner.get_disambiguator()

    caching.CacheImpl._locator_classes.insert(0, KernelCacheLocator)
    return KernelCacheLocator


KernelCacheLocator = _install_cache_locator()


def _install_unliteral_calls():
    """Type calls between streamrnn kernels by their arguments' plain types.

    Numba compiles a callee once per *literal* argument at a call site: ``f(x, 0)`` and
    ``f(x, 1)`` from jitted code make two more specialisations of ``f`` (and of everything
    it calls) beside ``f(x, n)``. Our kernels pass constant offsets, columns and flags all
    over, and each such call recompiled a whole step (about a minute, cold). Here a call
    to a kernel of this package is resolved with ``types.unliteral`` argument types, so one
    specialisation per argument type serves every call site; the caller casts the constant.
    Numba's own functions and anything outside streamrnn are left alone.
    """
    from numba.core import types
    from numba.core.types import functions

    plain_call_type = functions.Dispatcher.get_call_type

    def get_call_type(self, context, args, kws):
        module = getattr(getattr(self.dispatcher, "py_func", None), "__module__", None) or ""
        if module.split(".")[0] == "streamrnn":
            args = tuple(types.unliteral(a) for a in args)
            kws = {k: types.unliteral(v) for k, v in kws.items()}
        return plain_call_type(self, context, args, kws)

    functions.Dispatcher.get_call_type = get_call_type


_install_unliteral_calls()


#: Threading-layer entry points that compiled parallel regions call; ``_launch_threads``
#: binds them. Object code naming one needs the threading layer started before it runs.
_THREADING_SYMBOLS = (b"numba_parallel_for", b"do_scheduling_signed", b"do_scheduling_unsigned")


def _calls_threading_layer(libdata) -> bool:
    """Whether a cached library's code (object code and linking bitcode) runs a parallel region."""
    _name, _kind, data = libdata
    blobs = data if isinstance(data, tuple) else (data,)
    return any(isinstance(b, bytes) and any(s in b for s in _THREADING_SYMBOLS) for b in blobs)


#: ``CompileResult._rebuild``'s parameters in the pinned Numba (0.68.1), which the hook wraps.
_REBUILD_PARAMETERS = ("cls", "target_context", "libdata", "fndesc", "env", "signature", "objectmode", "lifted",
                       "typeann", "reload_init", "referenced_envs")


def _install_parallel_reload():
    """Start Numba's threading layer when a cached kernel that runs a parallel region loads.

    A kernel compiled with ``parallel=True`` records "start the threading layer" among its
    reload actions, and a kernel that calls it inherits them: but only from a callee compiled
    in the same process. When the callee came from the on-disk cache (Numba keeps no reload
    actions in a cached library), the caller is cached without them; a later process that
    loads that caller and runs it before any other parallel kernel enters the parallel
    region with no threading layer and segfaults (numba#8578, #9938; reproduced here with
    split.step_stream_split, a plain kernel calling the parallel split._pair, compiled in
    a process that had loaded _pair from the cache). So a cached library whose code calls the
    threading layer gets Numba's reload action whatever was recorded, and the actions a
    cached kernel carries are kept on its library, so that kernels compiled on top of it
    inherit them again (numba PR #9950's fix).
    """
    import inspect

    import numba
    from numba.core import compiler

    try:
        from numba.core.typed_passes import _reload_parfors
        plain_rebuild = compiler.CompileResult._rebuild.__func__
        known = list(inspect.signature(plain_rebuild).parameters) == list(_REBUILD_PARAMETERS)
    except (ImportError, AttributeError, TypeError, ValueError):
        known = False
    if not known:
        # Not the Numba this hook was written for (pyproject pins it): start the threading
        # layer now instead, so no kernel loaded later can enter a parallel region without it.
        numba.get_num_threads()
        return

    def _rebuild(cls, target_context, libdata, fndesc, env, signature, objectmode, lifted, typeann,
                 reload_init, referenced_envs):
        reload_init = list(reload_init or ())
        if _reload_parfors not in reload_init and _calls_threading_layer(libdata):
            reload_init.append(_reload_parfors)
        result = plain_rebuild(cls, target_context, libdata, fndesc, env, signature, objectmode, lifted, typeann,
                               reload_init, referenced_envs)
        result.library._reload_init.update(reload_init)
        return result

    compiler.CompileResult._rebuild = classmethod(_rebuild)


_install_parallel_reload()
