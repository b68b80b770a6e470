"""HTTP/1.1 to the model servers: per-endpoint keep-alive pools (bounded, idle expiry
below the servers' own keep-alive), connecting with a deadline, and the one tick that
checks every leased connection's first-byte and stream-idle deadlines. It is the
`Upstream` of seam.py; each request gets a connection's `UpstreamReply` (connection.py),
which alone gives that connection back here."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from time import perf_counter
from urllib.parse import urlsplit

from sidecar.dataplane.connection import Connection, UpstreamReply
from sidecar.policy.errors import Outcome
from sidecar.supervise import cancel_and_wait

# vLLM (uvicorn) closes idle keep-alive connections after 5 s: ours go after 3 s plus at
# most one sweep, so we never reuse a connection the server is closing at that instant.
IDLE_S = 3.0
SWEEP_S = 1.0
# Deadlines (first byte, stream idle) are checked by one tick for every connection instead
# of a timer each: uvloop's call_at + cancel costs ~9 µs, a set add + discard ~0.1 µs. So a
# first-byte timeout fires up to this much late.
TICK_S = 0.05
# LLM calls are long and each holds a connection, so the per-endpoint bound is generous.
PER_ENDPOINT = 256


class Origin:
    """One endpoint's address and its pool of keep-alive connections: the only writer of
    its slots (`in_use`), its idle list and its waiters."""

    __slots__ = ("host", "host_header", "idle", "in_use", "port", "retired", "tls", "waiters")

    def __init__(self, base_url: str, tls: ssl.SSLContext | None) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        secure = parts.scheme == "https"
        self.port = parts.port or (443 if secure else 80)
        self.tls = tls if secure else None
        self.host_header = parts.netloc.encode()
        self.idle: list[Connection] = []
        self.in_use = 0
        self.waiters: list[asyncio.Future[None]] = []
        self.retired = False  # its endpoint left the configuration: nothing goes back idle

    def wake_one(self) -> None:
        """A slot was freed: the first call still waiting for one gets it. Called wherever
        `in_use` drops; a waiter already done (timed out, cancelled) would swallow it."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return

    def give_back(self, conn: Connection, reusable: bool) -> None:
        """A reply let go of `conn`: idle if it can carry another request (and this pool
        still takes connections back), else closed; its slot goes to the next waiter."""
        self.in_use -= 1
        if reusable and not self.retired:
            conn.idle_since = conn.loop.time()
            self.idle.append(conn)
        else:
            conn.close()
        self.wake_one()

    def lost(self, conn: Connection) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)


class HttpUpstream:
    """Every endpoint's pool, one per sidecar."""

    def __init__(self, connect_timeout: float, idle_timeout: float,
                 tls: ssl.SSLContext | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.tls = tls if tls is not None else ssl.create_default_context()
        self._origins: dict[str, Origin] = {}
        self._retired: list[Origin] = []  # dropped by `retain`, answers still in flight
        # Leased: deadlines checked by the tick, which drops the ones let go since.
        self.watched: set[Connection] = set()
        self._sweeper = self.loop.create_task(self._sweep_forever())
        self._ticker = self.loop.create_task(self._tick_forever())

    async def send(self, base_url: str, method: bytes, target: bytes, headers: bytes,
                   body: bytes, deadline: float) -> UpstreamReply | Outcome:
        origin = self._origins.get(base_url)
        if origin is None:
            origin = self._origins[base_url] = Origin(base_url, self.tls)
        conn = self._idle(origin)
        if conn is None:
            conn = await self._acquire(origin, deadline)
            if not isinstance(conn, Connection):
                return conn
        head = conn.begin(method == b"HEAD", deadline)
        reply = conn.reply
        assert reply is not None
        self.watched.add(conn)
        framing = b"Content-Length: %d\r\n\r\n" % len(body) if body or method in (
            b"POST", b"PUT", b"PATCH") else b"\r\n"
        transport = conn.transport
        assert transport is not None
        request = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s%s" % (method, target, origin.host_header,
                                                            headers, framing)
        if body:  # never an empty buffer (asyncio on 3.13 would then never finish a close)
            transport.writelines((request, body))
        else:
            transport.write(request)
        reply.sent_at = perf_counter()  # until the answer arrives, the time is upstream's
        try:
            result = await head
        except BaseException:
            reply.release()
            raise
        if result is not reply:
            reply.release()
        return result

    def _idle(self, origin: Origin) -> Connection | None:
        """A kept-alive connection still fresh enough to reuse, if there is one."""
        idle = origin.idle
        if not idle:
            return None
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if transport is not None and not transport.is_closing() and \
                    now - conn.idle_since < IDLE_S:
                origin.in_use += 1
                conn.reused = True
                return conn
            conn.close()
        return None

    async def _acquire(self, origin: Origin, deadline: float) -> Connection | Outcome:
        """A fresh connection, waiting for a slot when the endpoint's bound is reached."""
        while True:
            if (conn := self._idle(origin)) is not None:
                return conn
            if origin.in_use < PER_ENDPOINT:
                break
            waiter = self.loop.create_future()
            origin.waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException as exc:
                with contextlib.suppress(ValueError):
                    origin.waiters.remove(waiter)
                if waiter.done() and not waiter.cancelled():
                    origin.wake_one()  # woken, but leaving: the slot goes to the next
                if isinstance(exc, TimeoutError):
                    return Outcome.POOL_FULL  # never sent: another pod may take it
                raise
        origin.in_use += 1
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: Connection(origin, self.loop), origin.host, origin.port,
                    ssl=origin.tls, server_hostname=origin.host if origin.tls else None)
        except TimeoutError:
            origin.in_use -= 1
            origin.wake_one()
            return Outcome.CONNECT_TIMEOUT
        except (OSError, ssl.SSLError):
            origin.in_use -= 1
            origin.wake_one()
            return Outcome.CONNECT_ERROR
        except BaseException:
            origin.in_use -= 1
            origin.wake_one()
            raise
        return conn

    def retain(self, base_urls: set[str]) -> None:
        """After a reload: the pools of endpoints no longer configured go, their idle
        connections closed now and their leased ones when their answer ends."""
        for base_url in [url for url in self._origins if url not in base_urls]:
            origin = self._origins.pop(base_url)
            origin.retired = True
            for conn in origin.idle:
                conn.close()
            origin.idle.clear()
            if origin.in_use:
                self._retired.append(origin)

    def in_use(self) -> int:
        return sum(origin.in_use for origin in self._origins.values()) + \
            sum(origin.in_use for origin in self._retired)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            now = self.loop.time()
            if self._retired:
                self._retired = [origin for origin in self._retired if origin.in_use]
            for origin in self._origins.values():
                expired = [c for c in origin.idle if now - c.idle_since >= IDLE_S]
                for conn in expired:
                    origin.idle.remove(conn)
                    conn.close()

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            if self.watched:
                now = self.loop.time()
                for conn in list(self.watched):
                    if conn.reply is None:
                        self.watched.discard(conn)
                    else:
                        conn.check(now, self.idle_timeout)

    async def aclose(self) -> None:
        # Replies still out close their connections when let go, as a retired pool's do.
        for origin in [*self._origins.values(), *self._retired]:
            origin.retired = True
        await cancel_and_wait((self._sweeper, self._ticker))
        for origin in self._origins.values():
            for conn in origin.idle:
                conn.close()
            origin.idle.clear()
