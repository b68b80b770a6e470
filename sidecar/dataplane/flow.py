"""Framing and flow-control rules both sides of the proxy share: the write-buffer marks
that pause a reader, and which answers carry no body. Pure values, one definition each."""

from __future__ import annotations

# uvloop's default low-water mark is 16 bytes; these bound what one stream keeps in memory
# (the app's connection and the upstream's alike): over WRITE_HIGH the other side pauses,
# under WRITE_LOW it reads again.
WRITE_HIGH = 64 * 1024
WRITE_LOW = 16 * 1024

# RFC 9110 §6.4.1: 1xx, 204 and 304 answers never have a body, whatever their headers say.
BODYLESS = frozenset({204, 304})


def has_body(status: int) -> bool:
    """May an answer with `status` carry a body (a HEAD's answer aside)?"""
    return status >= 200 and status not in BODYLESS
