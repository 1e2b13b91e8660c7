"""What a service process keeps out: libraries only the command line uses, and memory it no longer needs.

structlog imports ``rich`` when it is installed (for coloured tracebacks on a terminal); ``rich`` is
there for ``chargegate status`` and the demo (tables, live views), never for a service. Imported by a
service it costs about 5 MB and 80 modules in every process (bench/footprint). :func:`service_process`,
called first in each service's ``__main__``, makes ``import rich`` fail in that process only: structlog
then writes its plain tracebacks (same content, no colours). Tests and the CLI are unaffected.

pydantic looks for plugins (the ``pydantic`` entry point group) when it builds its first model: that
imports ``importlib.metadata`` (with email, zipfile, csv, tempfile, shutil, bz2, lzma ...) and reads the
metadata of every installed distribution, about 1.5 MB in each process. chargegate uses no pydantic plugin;
:func:`service_process` puts a plugin loader that finds none in place of pydantic's (its one function,
``get_plugins``), in the service processes only.

glibc's malloc gives threads that allocate their own arenas (up to 8 per core) and keeps what was freed in
its heaps. :func:`service_process` caps the arenas at :data:`ARENAS` (``mallopt(M_ARENA_MAX)``, before the
service's threads start; a ``MALLOC_ARENA_MAX`` in the environment, as the Dockerfiles and the compose file
set it, is glibc's own and is left as it is); :func:`release_memory` (``malloc_trim``), which the runtime
calls after start-up and then every :data:`chargegate.runtime.RELEASE_EVERY_S`, hands back the pages that
start-up (hundreds of TLS handshakes in smgw-link, the configuration's validation) and bursts freed inside
the heap. Elsewhere (musl, macOS) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import types
from collections.abc import Iterable

KEPT_OUT = ("rich",)
PYDANTIC_PLUGIN_LOADER = "pydantic.plugin._loader"
M_ARENA_MAX = -8  # mallopt(3)
ARENAS = 2

_libc: ctypes.CDLL | bool | None = False  # False: not looked up yet


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is False:
        _libc = None
        name = ctypes.util.find_library("c") or "libc.so.6"
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            lib = None
        if lib is not None and hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt"):
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            _libc = lib
    return _libc  # type: ignore[return-value]


def limit_arenas(arenas: int = ARENAS) -> bool:
    """At most ``arenas`` malloc arenas in this process (call before its threads start); not when the
    environment sets ``MALLOC_ARENA_MAX`` (glibc took that already). True when applied."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    lib = _glibc()
    return bool(lib is not None and lib.mallopt(M_ARENA_MAX, arenas))


def release_memory() -> bool:
    """Hand the free pages at the top of and inside malloc's heaps back to the system (glibc's
    ``malloc_trim(0)``). True when it released any."""
    lib = _glibc()
    return bool(lib is not None and lib.malloc_trim(0))


def _no_pydantic_plugins() -> Iterable[object]:
    return ()


def service_process() -> None:
    """Call before anything else is imported in a service's ``python -m`` entry point."""
    for name in KEPT_OUT:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # ``import rich`` raises ImportError
    if PYDANTIC_PLUGIN_LOADER not in sys.modules:
        loader = types.ModuleType(PYDANTIC_PLUGIN_LOADER, "chargegate.lean: no pydantic plugins in a service process")
        loader.get_plugins = _no_pydantic_plugins  # type: ignore[attr-defined]
        sys.modules[PYDANTIC_PLUGIN_LOADER] = loader
    limit_arenas()
