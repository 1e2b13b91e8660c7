"""A device read over its local HTTP JSON API (e.g. a Shelly Pro 3EM's ``/rpc/EM.GetStatus?id=0``).

:class:`HttpLink` is the HTTP counterpart of :class:`evse_poller.transport.Link`: one per host:port,
a lock that serialises the requests to it, a timeout per request, reconnect backoff after a failed
connect, and the same errors (:class:`LinkError` when nothing usable came back, :class:`DeviceRejected`
when the device answered but refused). Each request is a plain HTTP/1.1 GET on a fresh connection
(``Connection: close``): a meter polled once a second needs no keep-alive, and a device that
restarts never leaves a half-open connection behind.

:func:`extract_json` takes the profile's ``http.values`` out of the answers: every value must be a
JSON number (not a boolean, not a string), finite; a missing path or another type is ``None`` with an
error naming the value and the path. Plausibility (ranges, monotonic energy) is the same as for
Modbus meters, in :func:`evse_poller.logic.evaluate_meter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from typing import Any

from evse_poller.profile import Profile
from evse_poller.resolve import resolve
from evse_poller.transport import DeviceRejected, Endpoint, LinkError

Value = float | int | str | None

MAX_HEADER_BYTES = 8192
MAX_DEPTH = 32


class HttpLink:
    """HTTP GETs to one host:port, one at a time."""

    def __init__(self, endpoint: Endpoint, backoff_max_s: float = 30.0, connect_timeout_s: float = 2.0) -> None:
        self.endpoint = endpoint
        self.backoff_max_s = backoff_max_s
        self.connect_timeout_s = connect_timeout_s
        self.lock = asyncio.Lock()
        self.generation = 1  # no session state: a device that restarted needs no new initialisation
        self.requests = 0
        self.failures = 0
        self._ok = False
        self._backoff = 0.0
        self._next_attempt = 0.0
        self._last_error: str | None = None

    @property
    def connected(self) -> bool:
        """The last request reached the device (there is no connection kept between requests)."""
        return self._ok

    async def connect(self) -> int:
        return self.generation

    def close(self) -> None:
        self._ok = False

    def _failed_connect(self, why: str) -> LinkError:
        self._ok = False
        self._last_error = why
        self._backoff = min(self.backoff_max_s, max(0.5, self._backoff * 2))
        self._next_attempt = time.monotonic() + self._backoff
        return LinkError(f"cannot connect to {self.endpoint.describe()}: {why}")

    async def get_json(self, path: str, timeout_s: float, max_body_bytes: int = 65536) -> Any:
        """GET ``path`` and parse the answer as JSON. Raises LinkError / DeviceRejected."""
        what = f"GET {self.endpoint.describe()}{path}"
        async with self.lock:
            now = time.monotonic()
            if now < self._next_attempt:
                raise LinkError(f"not connected to {self.endpoint.describe()} ({self._last_error}); "
                                f"next attempt in {self._next_attempt - now:.1f} s")
            self.requests += 1
            writer: asyncio.StreamWriter | None = None
            try:
                async with asyncio.timeout(timeout_s):
                    try:
                        addr = await resolve(self.endpoint.host, self.endpoint.port, timeout_s)
                        reader, writer = await asyncio.open_connection(addr, self.endpoint.port)
                    except OSError as e:
                        self.failures += 1
                        raise self._failed_connect(f"{type(e).__name__}: {e.strerror or e}") from None
                    host = self.endpoint.host if ":" not in self.endpoint.host else f"[{self.endpoint.host}]"
                    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{self.endpoint.port}\r\n"
                                 "Accept: application/json\r\nUser-Agent: chargegate-evse-poller\r\n"
                                 "Connection: close\r\n\r\n".encode("ascii"))
                    await writer.drain()
                    status, body = await _read_response(reader, max_body_bytes)
            except TimeoutError:
                self.failures += 1
                self._ok = False
                raise LinkError(f"{what}: no answer within {timeout_s:g} s") from None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                self.failures += 1
                self._ok = False
                raise LinkError(f"{what}: {type(e).__name__}: {e}") from None
            except _BadResponse as e:
                self.failures += 1
                self._ok = False
                raise LinkError(f"{what}: {e}") from None
            finally:
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
            self._ok = True
            self._backoff = 0.0
            self._next_attempt = 0.0
        if status == 401:
            raise DeviceRejected(f"{what}: HTTP 401, the device asks for a password (authentication is not "
                                 "supported: turn it off on the device's local web interface)")
        if status != 200:
            raise DeviceRejected(f"{what}: HTTP {status}")
        try:
            return parse_json(body)
        except ValueError as e:
            raise DeviceRejected(f"{what}: the answer is not usable JSON: {e}") from None


class _BadResponse(Exception):
    pass


async def _read_response(reader: asyncio.StreamReader, max_body: int) -> tuple[int, bytes]:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await reader.read(1024)
        if not chunk:
            raise _BadResponse("connection closed before the response header ended")
        head += chunk
        if len(head) > MAX_HEADER_BYTES + max_body:
            raise _BadResponse("response header too long")
    header, _, rest = head.partition(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise _BadResponse(f"not an HTTP response: {lines[0][:60]!r}")
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        k, sep, v = line.partition(":")
        if sep:
            headers[k.strip().lower()] = v.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader, rest, max_body)
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise _BadResponse(f"Content-Length {headers['content-length'][:20]!r}") from None
        if not 0 <= length <= max_body:
            raise _BadResponse(f"answer of {length} bytes, more than the profile's max_body_bytes {max_body}")
        body = rest + (await reader.readexactly(length - len(rest)) if length > len(rest) else b"")
        body = body[:length]
    else:  # to the end of the connection
        body = rest
        while True:
            chunk = await reader.read(4096)
            if not chunk:
                break
            body += chunk
            if len(body) > max_body:
                raise _BadResponse(f"answer longer than the profile's max_body_bytes {max_body}")
    if len(body) > max_body:
        raise _BadResponse(f"answer longer than the profile's max_body_bytes {max_body}")
    return status, body


async def _read_chunked(reader: asyncio.StreamReader, buf: bytes, max_body: int) -> bytes:
    body = b""
    while True:
        while b"\r\n" not in buf:
            more = await reader.read(1024)
            if not more:
                raise _BadResponse("connection closed inside a chunked answer")
            buf += more
        size_line, _, buf = buf.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError:
            raise _BadResponse("bad chunk size") from None
        if size == 0:
            return body
        if len(body) + size > max_body:
            raise _BadResponse(f"answer longer than the profile's max_body_bytes {max_body}")
        while len(buf) < size + 2:
            more = await reader.read(4096)
            if not more:
                raise _BadResponse("connection closed inside a chunk")
            buf += more
        body += buf[:size]
        buf = buf[size + 2:]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > 16:
        raise ValueError(f"integer with {len(text)} digits is out of range")
    return int(text)


def _depth(data: Any, level: int = 0) -> None:
    if level > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH}")
    if isinstance(data, dict):
        for v in data.values():
            _depth(v, level + 1)
    elif isinstance(data, list):
        for v in data:
            _depth(v, level + 1)


def parse_json(body: bytes) -> Any:
    """A device's JSON answer; NaN/Infinity, huge integers and deep nesting are ValueErrors.
    (-0.0 is accepted: a meter printing "-0.0" W means 0.)"""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8: {e.reason}") from None
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_int=_int)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{e.msg} at line {e.lineno} column {e.colno}") from None
    _depth(data)
    return data


def _walk(doc: Any, path: str) -> tuple[bool, Any]:
    cur = doc
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return False, None
    return True, cur


def extract_json(profile: Profile, docs: dict[str, Any]) -> tuple[dict[str, Value], list[str]]:
    """The profile's ``http.values`` from the parsed answers (request name -> document).

    Returns (values, errors): engineering values (number * scale); ``None`` with an error for a path
    that is not there, a value that is not a finite JSON number (booleans and strings are refused),
    and ``None`` without an error for JSON null (the device says: not measured)."""
    assert profile.http is not None
    values: dict[str, Value] = {}
    errors: list[str] = []
    for name, spec in profile.http.values.items():
        if spec.request not in docs:
            values[name] = None
            continue
        found, raw = _walk(docs[spec.request], spec.path)
        if not found:
            values[name] = None
            errors.append(f"{name}: {spec.path} is not in the answer to {spec.request}")
        elif raw is None:
            values[name] = None
        elif isinstance(raw, bool) or not isinstance(raw, int | float):
            values[name] = None
            errors.append(f"{name}: {spec.path} is {type(raw).__name__} {str(raw)[:20]!r}, not a number")
        elif not math.isfinite(float(raw)) or abs(float(raw)) > 1e15:
            values[name] = None
            errors.append(f"{name}: {spec.path} is out of range ({raw!r})")
        else:
            v = float(raw) * spec.scale
            values[name] = v + 0.0  # no negative zero
    return values, errors
