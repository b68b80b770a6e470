"""The reference the differential wire tests compare the sidecar with: h11 (an HTTP/1.1
parser independent of the sidecar's llhttp) reads the bytes a peer sent and says which
messages they hold, and these functions say what a conforming proxy forwards of them
(RFC 9110 §7.6.1 hop-by-hop fields removed, framing its own)."""

from __future__ import annotations

from dataclasses import dataclass, field

import h11

# RFC 9110 §7.6.1 connection-specific fields, plus the non-standard ones still seen.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"proxy-authenticate",
                        b"proxy-authorization"})
# What the sidecar documents it replaces on the way up: framing is its own, Host names the
# upstream, Expect is answered by the sidecar (it buffers the body), HTTP2-Settings belongs
# to the h2c upgrade it declines.
REQUEST_OWN = frozenset({b"host", b"content-length", b"expect", b"http2-settings"})
RESPONSE_OWN = frozenset({b"content-length"})

Header = tuple[bytes, bytes]


@dataclass
class RefRequest:
    """One request as h11 read it from the client's bytes."""

    method: bytes
    target: bytes
    version: bytes
    headers: list[Header]  # lowercase names, values as h11 normalises them
    body: bytes = b""
    complete: bool = False  # False: the bytes ended inside this request
    error: str = ""  # h11 refused it
    keep_alive: bool = True  # h11 would read another request after it
    start: int = 0  # offsets of this request in the client's stream
    end: int = 0


def connection_tokens(headers: list[Header]) -> set[bytes]:
    return {token.strip().lower() for name, value in headers if name == b"connection"
            for token in value.split(b",") if token.strip()}


def end_to_end(headers: list[Header], own: frozenset[bytes]) -> list[Header]:
    """The fields a proxy passes on: not hop-by-hop, not named by Connection (RFC 9110
    §7.6.1), not the ones the proxy sets itself; order kept."""
    drop = HOP_BY_HOP | own | connection_tokens(headers)
    return [(name.lower(), value) for name, value in headers if name.lower() not in drop]


def _skip_empty_lines(data: bytes) -> bytes:
    # RFC 9112 §2.2: a server SHOULD ignore at least one empty line before a request-line
    # (h11 refuses them, llhttp skips them).
    while data.startswith((b"\r\n", b"\n")):
        data = data[2:] if data.startswith(b"\r\n") else data[1:]
    return b"" if data == b"\r" else data  # the start of one more


def parse_requests(stream: bytes, closed: bool = False) -> list[RefRequest]:
    """Every request h11 reads from `stream`, in order; the last may be incomplete or
    refused. Reading stops where h11 would stop reading the connection (a request that
    closes it, an error, a protocol switch)."""
    requests: list[RefRequest] = []
    rest = stream
    while True:
        skipped = _skip_empty_lines(rest)
        offset = len(stream) - len(skipped)
        rest = skipped
        if not rest:
            return requests
        parser = h11.Connection(h11.SERVER)
        parser.receive_data(rest)
        if closed:
            parser.receive_data(b"")
        current: RefRequest | None = None
        body = bytearray()
        try:
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED or \
                        isinstance(event, h11.ConnectionClosed):
                    if current is not None:
                        current.body = bytes(body)
                    elif event is h11.NEED_DATA:  # a head cut short
                        requests.append(RefRequest(b"", b"", b"", [], start=offset))
                    return requests
                if isinstance(event, h11.Request):
                    current = RefRequest(bytes(event.method), bytes(event.target),
                                         bytes(event.http_version),
                                         [(bytes(k), bytes(v)) for k, v in event.headers],
                                         start=offset)
                    requests.append(current)
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
        except h11.RemoteProtocolError as exc:
            if current is None:
                requests.append(RefRequest(b"", b"", b"", [], start=offset, error=str(exc)))
            else:
                current.error = str(exc)
                current.body = bytes(body)
            return requests
        assert current is not None
        current.body = bytes(body)
        current.complete = True
        leftover, _ = parser.trailing_data
        current.end = len(stream) - len(leftover)
        rest = bytes(leftover)
        tokens = connection_tokens(current.headers)
        # h11 has no HTTP/1.0 keep-alive; RFC 9112 §9.3 lets a 1.0 request ask for it.
        names = {name for name, _ in current.headers}
        current.keep_alive = b"close" not in tokens and (
            current.version == b"1.1" or b"keep-alive" in tokens) and not (
            # RFC 9112 §6.3: after a request with both, the server MUST close.
            {b"content-length", b"transfer-encoding"} <= names)
        if not current.keep_alive or current.method == b"CONNECT":
            return requests


@dataclass
class RefResponse:
    """A response as h11 read it from the upstream's bytes."""

    status: int = 0
    reason: bytes = b""
    headers: list[Header] = field(default_factory=list)
    body: bytes = b""
    interim: int = 0  # 1xx responses before it
    head: bool = False  # the head was read
    complete: bool = False
    error: str = ""
    keep_alive: bool = False  # the connection may carry another request after it
    trailing: bytes = b""  # bytes after the complete response


def parse_response(method: bytes, data: bytes, closed: bool) -> RefResponse:
    """The answer h11 reads from `data` to a `method` request (`closed`: the peer closed
    after sending it)."""
    parser = h11.Connection(h11.CLIENT)
    parser.send(h11.Request(method=method, target="/", headers=[("Host", "u")]))
    parser.send(h11.EndOfMessage())
    parser.receive_data(data)
    if closed:
        parser.receive_data(b"")
    ref = RefResponse()
    body = bytearray()
    try:
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED or \
                    isinstance(event, h11.ConnectionClosed):
                break
            if isinstance(event, h11.InformationalResponse):
                ref.interim += 1
            elif isinstance(event, h11.Response):
                ref.head = True
                ref.status = event.status_code
                ref.reason = bytes(event.reason)
                ref.headers = [(bytes(k), bytes(v)) for k, v in event.headers]
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                ref.complete = True
                ref.keep_alive = parser.their_state is h11.DONE
                ref.trailing = bytes(parser.trailing_data[0])
                break
    except (h11.RemoteProtocolError, h11.LocalProtocolError) as exc:
        ref.error = str(exc)
    ref.body = bytes(body)
    return ref


@dataclass
class Answer:
    """One final response the client read from the sidecar, as h11 read it."""

    status: int
    headers: list[Header]
    body: bytes
    complete: bool
    interim: int = 0


def parse_answers(methods: list[bytes], data: bytes, closed: bool) -> tuple[list[Answer], str]:
    """The responses h11 reads from what the client received, one per method in order
    (fewer if the data ends); the second value names a framing error h11 found (any is a
    defect: the sidecar's output must always be well-formed)."""
    parser = h11.Connection(h11.CLIENT)
    parser.receive_data(data)
    eof = closed  # fed to h11 once a request is out (h11 refuses it before)
    answers: list[Answer] = []
    for method in methods:
        if parser.our_state is not h11.IDLE:
            break
        # Only HEAD changes how a response is framed; h11 would refuse an invalid method.
        parser.send(h11.Request(method=b"HEAD" if method == b"HEAD" else b"GET", target="/",
                                headers=[("Host", "s")]))
        parser.send(h11.EndOfMessage())
        answer: Answer | None = None
        interim = 0
        body = bytearray()
        try:
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA and eof:
                    eof = False
                    parser.receive_data(b"")
                    continue
                if event is h11.NEED_DATA or event is h11.PAUSED or \
                        isinstance(event, h11.ConnectionClosed):
                    if answer is not None:
                        answer.body = bytes(body)
                        answers.append(answer)
                    return answers, ""
                if isinstance(event, h11.InformationalResponse):
                    interim += 1
                elif isinstance(event, h11.Response):
                    answer = Answer(event.status_code,
                                    [(bytes(k), bytes(v)) for k, v in event.headers], b"",
                                    False, interim)
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
        except h11.RemoteProtocolError as exc:
            if answer is not None:
                answer.body = bytes(body)
                answers.append(answer)
            if (answer is None and parser.their_state is h11.ERROR and \
                    "ConnectionClosed" in str(exc)) or \
                    "peer closed connection without sending complete message body" in str(exc):
                # Closed before an answer, or an answer visibly cut short: not malformed;
                # the caller judges whether it was allowed.
                return answers, ""
            return answers, f"the sidecar's response is malformed: {exc}"
        assert answer is not None
        answer.body = bytes(body)
        answer.complete = True
        answers.append(answer)
        if parser.their_state is h11.DONE and parser.our_state is h11.DONE:
            parser.start_next_cycle()
        else:
            break
    leftover = parser.trailing_data[0]
    if leftover and parser.their_state is h11.MUST_CLOSE:
        return answers, f"bytes after a response that closes the connection: {leftover[:80]!r}"
    return answers, ""
