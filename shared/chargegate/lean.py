"""What a service process keeps out: libraries only the command line uses, and memory it no longer needs.

structlog imports ``rich`` when it is installed (for coloured tracebacks on a terminal); ``rich`` is
there for ``chargegate status`` and the demo (tables, live views), never for a service. Imported by a
service it costs about 5 MB and 80 modules in every process (bench/footprint). :func:`service_process`,
called first in each service's ``__main__``, makes ``import rich`` fail in that process only: structlog
then writes its plain tracebacks (same content, no colours). Tests and the CLI are unaffected.

glibc's malloc gives every thread that allocates its own arena (up to 8 per core) and keeps what was freed
in them; a service has the event loop's thread, paho's network thread and the default executor's. With
``M_ARENA_MAX`` 2 they share two arenas; :func:`release_memory` (``malloc_trim``) hands back what start-up
(the configuration's pydantic schemas are built and dropped) and bursts freed. Elsewhere (musl, macOS) both
do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

KEPT_OUT = ("rich",)
M_ARENA_MAX = -8  # mallopt(3)
ARENAS = 2

_libc: ctypes.CDLL | bool | None = False  # False: not looked up yet


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is False:
        _libc = None
        name = ctypes.util.find_library("c")
        if name:
            try:
                lib = ctypes.CDLL(name)
                if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt"):
                    _libc = lib
            except OSError:
                pass
    return _libc  # type: ignore[return-value]


def limit_arenas(arenas: int = ARENAS) -> bool:
    """At most ``arenas`` malloc arenas for this process (before its threads start). True when applied."""
    lib = _glibc()
    return bool(lib is not None and lib.mallopt(M_ARENA_MAX, arenas))


def release_memory() -> bool:
    """Return the freed memory at the top and inside malloc's heaps to the system (glibc ``malloc_trim``).
    True when it released any."""
    lib = _glibc()
    return bool(lib is not None and lib.malloc_trim(0))



def service_process() -> None:
    """Call before anything else is imported in a service's ``python -m`` entry point."""
    for name in KEPT_OUT:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # ``import rich`` raises ImportError
    limit_arenas()
