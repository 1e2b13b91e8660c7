"""What a service process keeps out: libraries only the command line uses.

structlog imports ``rich`` when it is installed (for coloured tracebacks on a terminal); ``rich`` is
there for ``chargegate status`` and the demo (tables, live views), never for a service. Imported by a
service it costs about 5 MB and 80 modules in every process (bench/footprint). :func:`service_process`,
called first in each service's ``__main__``, makes ``import rich`` fail in that process only: structlog
then writes its plain tracebacks (same content, no colours). Tests and the CLI are unaffected.
"""

from __future__ import annotations

import sys

KEPT_OUT = ("rich",)


def service_process() -> None:
    """Call before anything else is imported in a service's ``python -m`` entry point."""
    for name in KEPT_OUT:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # ``import rich`` raises ImportError
