"""The supervisor's side of the worker link, reduced to what tests need: a
ROUTER a test binds, the worker command line, and typed send/receive, so a
real worker process can be driven message by message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import zmq

from bastion.protocol import (
    PROTOCOL_VERSION,
    Heartbeat,
    Hello,
    HelloAccepted,
    SamplingParams,
    supervisor_worker_codec,
)
from bastion.protocol.common import Message
from bastion.protocol.worker_wire import FromWorker, Generate, GenerationFinished, WorkerReady

TIMEOUT = 15.0  # generous: the machine is small and shared


class FakeSupervisor:
    """The supervisor's side of the worker link, reduced to what tests need."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.endpoint = f"ipc://{directory}/w.sock"
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(self.endpoint)
        self.codec = supervisor_worker_codec()
        self.identity = b""
        self.heartbeats: list[Heartbeat] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def command(self, *extra: str, engine: str = "fake", model: str = "/nonexistent.gguf") -> list[str]:
        return [
            sys.executable, "-m", "bastion.worker",
            "--endpoint", self.endpoint, "--worker-id", "w1", "--name", "test-model",
            "--model-path", model, "--engine", engine, "--threads", "2", "--n-ctx", "2048",
            *extra,
        ]  # fmt: skip

    def spawn(self, command: list[str]) -> subprocess.Popen[bytes]:
        log = self.directory / f"stderr-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as stderr:
            process = subprocess.Popen(command, stderr=stderr)
        self.processes.append(process)
        return process

    def start(self, *extra: str, **kwargs: str) -> subprocess.Popen[bytes]:
        return self.spawn(self.command(*extra, **kwargs))

    def script(self, *replies: str) -> str:
        path = self.directory / "script.json"
        path.write_text(json.dumps(list(replies)))
        return str(path)

    def recv_raw(self, timeout: float = TIMEOUT) -> FromWorker:
        assert self.router.poll(timeout * 1000), f"nothing from the worker in {timeout} s\n{self.stderr()}"
        identity, frame = self.router.recv_multipart()
        self.identity = identity
        return self.codec.decode(frame)

    def recv(self, timeout: float = TIMEOUT) -> FromWorker:
        """The next message that is not a heartbeat (those are kept)."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.recv_raw(max(0.01, deadline - time.monotonic()))
            if not isinstance(message, Heartbeat):
                return message
            self.heartbeats.append(message)

    def send(self, message: Message) -> None:
        self.send_raw(self.codec.encode(message))

    def send_raw(self, frame: bytes) -> None:
        self.router.send_multipart([self.identity, frame])

    def accept(self) -> Hello:
        hello = self.recv()
        assert isinstance(hello, Hello)
        self.send(HelloAccepted(protocol_version=PROTOCOL_VERSION, supervisor_pid=os.getpid()))
        return hello

    def ready(self) -> WorkerReady:
        self.accept()
        ready = self.recv()
        assert isinstance(ready, WorkerReady), ready
        return ready

    def generate(self, request_id: str, prompt: str = "Hi", **sampling: object) -> None:
        params = SamplingParams(**sampling)  # type: ignore[arg-type]
        self.send(Generate(request_id=request_id, session_id="s", prompt=prompt, sampling=params))

    def until_finished(self, request_id: str) -> list[FromWorker]:
        messages: list[FromWorker] = []
        while True:
            message = self.recv()
            messages.append(message)
            if isinstance(message, GenerationFinished) and message.request_id == request_id:
                return messages

    def stderr(self) -> str:
        return "\n".join(log.read_text(errors="replace")[-3000:] for log in self.logs if log.exists())

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        self.router.close()
        self.context.term()
