"""Header rules both directions share: hop-by-hop filtering (RFC 9110 §7.6.1 plus every
header a `Connection` header names) and serializing a head. Pure functions on bytes."""

from __future__ import annotations

from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1's connection-specific fields, plus the non-standard ones still seen.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"proxy-authenticate",
                        b"proxy-authorization"})
# Framing is the sidecar's own on each hop; Host names the upstream; Expect is answered by
# the sidecar itself (it buffers the body), so an upstream never waits for a 100 we swallow.
# `x-session-final` is a word to the sidecar (end the session), not to the model server.
REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"http2-settings",
                             b"x-session-final"}
RESPONSE_DROP = HOP_BY_HOP | {b"content-length"}


def header_block(headers: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes],
                 connection: bytes | None = None) -> bytes:
    """`Name: value\\r\\n` lines of `headers` minus `drop` and the fields `connection` (the
    Connection header's value, when there was one) names."""
    if connection:
        drop = drop | {token.strip().lower() for token in connection.split(b",")}
    return b"".join([b"%s: %s\r\n" % (name, value) for name, value in headers
                     if name.lower() not in drop])


def with_header(headers: Headers, name: bytes, value: bytes, drop: frozenset[bytes],
                connection: bytes | None) -> bytes:
    """The forwarded block with `name` set to `value` (e.g. a pool's own Authorization)."""
    lower = name.lower()
    return header_block(headers, drop | {lower}, connection) + b"%s: %s\r\n" % (name, value)


def get(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header `name` (lowercase), or None."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


# RFC 9110 §5.5: a field value is visible characters, obs-text, space and tab.
_VALUE_BAD = bytes(c for c in range(256) if (c < 0x20 and c != 0x09) or c == 0x7F)
# RFC 9110 §5.6.2: a field name is a token.
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def refused_header(head: bytes) -> bytes | None:
    """The name of the first header line in `head` (a request head, possibly cut or with
    bytes before it) whose value holds a character HTTP forbids, as sent; None if none
    does. The parser only says *what* it refused; this says *where*, for the error."""
    for line in head.split(b"\n"):
        name, colon, value = line.partition(b":")
        if not colon or not name or not _TOKEN.issuperset(name):
            continue
        if value.endswith(b"\r"):
            value = value[:-1]
        if len(value.translate(None, _VALUE_BAD)) != len(value):
            return name
    return None
