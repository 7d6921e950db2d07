"""The peer: llama-cpp-python's own OpenAI-compatible server, driven as an OpenAI client would.

`PeerServer` starts `python -m llama_cpp.server` on a free localhost port with
the settings the comparison fixes (model, n_ctx, threads) and the server's
defaults for everything else, waits until `/v1/models` answers, and stops the
process it started. `chat` posts the whole message list to the streaming
`/v1/chat/completions` each turn and times the first content delta.

When a prompt outgrows the context, this server answers a streaming request
with HTTP 200 and then closes the stream with no data and no `[DONE]`; the
reason is only in its log. `chat` reports such a stream as an error and
quotes the log's last exception line.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from vs_peer_reply import Reply

_READY_TIMEOUT_S = 180.0
_REQUEST_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class PeerSettings:
    model: Path
    n_ctx: int
    threads: int
    cache: bool  # --cache true --cache_type ram


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PeerServer:
    def __init__(self, settings: PeerSettings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        s = self.settings
        argv = [
            sys.executable, "-m", "llama_cpp.server", "--model", str(s.model), "--n_ctx", str(s.n_ctx),
            "--n_threads", str(s.threads), "--n_threads_batch", str(s.threads),
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        if s.cache:
            argv += ["--cache", "true", "--cache_type", "ram"]
        return argv

    def start(self) -> float:
        """Start the server; returns the seconds until it answered /v1/models."""
        self.port = free_port()
        started = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = started + _READY_TIMEOUT_S
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the peer server exited with code {self.process.returncode}; see {self.log_path}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                try:
                    connection.request("GET", "/v1/models")
                    if connection.getresponse().status == 200:
                        return time.perf_counter() - started
                finally:
                    connection.close()
            time.sleep(0.05)
        raise RuntimeError(f"the peer server did not answer /v1/models within {_READY_TIMEOUT_S:.0f} s")

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

    def rss_bytes(self) -> int:
        if self.process is None:
            return 0
        try:
            return psutil.Process(self.process.pid).memory_info().rss
        except psutil.Error:
            return 0

    def chat(self, messages: list[dict[str, str]], max_tokens: int, banned_tokens: list[int]) -> Reply:
        """One streaming chat completion, greedy; `banned_tokens` (end of generation)
        get a logit bias of -100 so every reply runs to `max_tokens`."""
        body = json.dumps({
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "logit_bias": {str(t): -100.0 for t in banned_tokens},
        })  # fmt: skip
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=_REQUEST_TIMEOUT_S)
        connection.connect()  # an OpenAI client has its connection pooled: keep connecting out of the timing
        log_offset = self._log_size()
        reply = Reply(sent_at=time.perf_counter())
        try:
            connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            reply.details["http_status"] = response.status
            if response.status != 200:
                reply.error = f"HTTP {response.status}: {response.read().decode(errors='replace')[:300]}"
                reply.error_at = time.perf_counter()
                return reply
            done = self._read_stream(response, reply)
            reply.end_at = time.perf_counter()
            if not done:
                reply.error_at = reply.end_at
                reply.error = "HTTP 200, then the stream closed without " + (
                    "any data or [DONE]" if reply.first_token_at is None else "[DONE]"
                )
                if reason := self.logged_exception(log_offset):
                    reply.error += f" (server log: {reason})"
        except (OSError, http.client.HTTPException) as exc:
            reply.error = f"{type(exc).__name__}: {exc}"
            reply.error_at = time.perf_counter()
        finally:
            connection.close()
        return reply

    @staticmethod
    def _read_stream(response: http.client.HTTPResponse, reply: Reply) -> bool:
        """Read server-sent events into `reply`; True if the stream ended with [DONE]."""
        while line := response.readline():
            if not line.startswith(b"data:"):
                continue  # blank separators and ": ping" comments
            data = line[5:].strip()
            if data == b"[DONE]":
                return True
            chunk = json.loads(data)
            if "error" in chunk:
                reply.error = str(chunk["error"])
                reply.error_at = time.perf_counter()
                continue
            delta = chunk["choices"][0].get("delta", {}) if chunk.get("choices") else {}
            if "content" in delta and delta["content"] is not None:
                now = time.perf_counter()
                if reply.first_token_at is None:
                    reply.first_token_at = now
                reply.token_times.append(now)
                reply.text += delta["content"]
                reply.completion_tokens += 1
        return False

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def logged_exception(self, offset: int, wait_s: float = 1.0) -> str:
        """The last exception line the server logged after byte `offset` (it may
        log it a moment after closing the stream)."""
        deadline = time.perf_counter() + wait_s
        while True:
            with contextlib.suppress(OSError), open(self.log_path, "rb") as log:
                log.seek(offset)
                lines = log.read().decode(errors="replace").splitlines()
                for line in reversed(lines):
                    if "Error:" in line and not line.lstrip().startswith(("|", "File")):
                        return line.strip()
            if time.perf_counter() > deadline:
                return ""
            time.sleep(0.05)
