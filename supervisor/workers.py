"""Model worker processes as the supervisor sees them.

`WorkerPool` spawns `python -m bastion.worker` children, answers their hello,
and watches each one's exit directly (an asyncio task awaits the process), so
a crash is noticed the moment it happens rather than when heartbeats stop.
`WorkerHandle` is one such child: its state, what it reported when ready, the
tail of its stderr, the generation it is serving and a bounded queue of generations waiting
for it. A worker serves one generation at a time; it keeps that session's KV
state warm for the next one.

This module never touches the client socket: runs carry their own way back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from bastion.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    ErrorCode,
    GenerationStats,
    Heartbeat,
    Hello,
    HelloAccepted,
    HomeLayout,
    RequestFailed,
    Role,
    Shutdown,
    StopReason,
    TokenDelta,
    WorkerState,
)
from bastion.protocol.worker_wire import (
    FromWorker,
    Generate,
    GenerationFinished,
    ModelDescription,
    ToWorker,
    WorkerLoadFailed,
    WorkerReady,
)
from bastion.supervisor.config import SupervisorConfig
from bastion.supervisor.errors import InvalidModelFileError, ModelSourceError, SupervisorError
from bastion.supervisor.runs import Generation

log = logging.getLogger(__name__)

SendToWorker = Callable[[bytes, ToWorker], None]


class QueueFullError(SupervisorError):
    code = ErrorCode.BUSY


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


class WorkerHandle:
    def __init__(
        self,
        *,
        worker_id: str,
        name: str,
        model_path: Path,
        n_ctx: int,
        threads: int,
        send: SendToWorker,
        config: SupervisorConfig,
    ) -> None:
        self.worker_id = worker_id
        self.identity = worker_id.encode()
        self.name = name
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.threads = threads
        self.state = WorkerState.STARTING
        self.process: asyncio.subprocess.Process | None = None
        self.description: ModelDescription | None = None
        self.ready: asyncio.Future[ModelDescription] = asyncio.get_running_loop().create_future()
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.stderr_tail: deque[str] = deque(maxlen=config.stderr_tail_lines)
        self.current: Generation | None = None
        self.queue: deque[Generation] = deque()
        self.last_seen = time.monotonic()
        self.kv_tokens = 0
        self.progress = 0
        self.template_source = ""
        self.killed_as_hung = False
        self._send = send
        self._config = config

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    def send(self, message: ToWorker) -> None:
        self._send(self.identity, message)

    # --- runs -------------------------------------------------------------

    def submit(self, generation: Generation) -> None:
        """Start generation `generation` now if the worker is idle, else queue it (bounded)."""
        if self.state not in (WorkerState.IDLE, WorkerState.BUSY):
            raise SupervisorError(f"model {self.name} is {self.state.value}, not serving")
        if self.current is None:
            self._start(generation)
            return
        if len(self.queue) >= self._config.max_queued_per_worker:
            raise QueueFullError(
                f"model {self.name} has {len(self.queue)} requests waiting; try again shortly"
            )
        self.queue.append(generation)

    def cancel(self, generation: Generation) -> None:
        if generation is self.current:
            self.send(Cancel(request_id=generation.internal_id))
        elif generation in self.queue:
            self.queue.remove(generation)
            generation.deliver(GenerationFinished(request_id=generation.internal_id, stop_reason=StopReason.CANCELLED,
                                           completion_tokens=0, kv_tokens=self.kv_tokens))

    def _start(self, generation: Generation) -> None:
        self.current = generation
        self.state = WorkerState.BUSY
        self.send(
            Generate(
                request_id=generation.internal_id,
                session_id=generation.session_id,
                prompt=generation.prompt,
                sampling=generation.sampling,
            )
        )

    def _next(self) -> None:
        self.current = None
        if self.state is WorkerState.BUSY:
            self.state = WorkerState.IDLE
        while self.queue and self.state is WorkerState.IDLE:
            generation = self.queue.popleft()
            if not generation.done:
                self._start(generation)

    # --- messages from the worker -----------------------------------------

    def on_message(self, message: FromWorker) -> None:
        self.last_seen = time.monotonic()
        match message:
            case Hello():
                self._on_hello(message)
            case WorkerReady(model=description):
                self.description = description
                if self.state is WorkerState.LOADING:  # never revive a worker being stopped
                    self.state = WorkerState.IDLE
                if not self.ready.done():
                    self.ready.set_result(description)
                log.info("worker %s (%s, pid %d) ready in %.0f ms", self.worker_id, self.name, self.pid,
                         description.load_ms)
            case WorkerLoadFailed(code=code, message=text):
                error_type = InvalidModelFileError if code is ErrorCode.INVALID_MODEL_FILE else ModelSourceError
                if not self.ready.done():
                    self.ready.set_exception(error_type(f"{self.name}: {text}"))
            case Heartbeat():
                self.kv_tokens = message.kv_tokens
                self.progress = message.progress
            case TokenDelta() | GenerationStats():
                if self.current and message.request_id == self.current.internal_id:
                    self.current.deliver(message)
            case RequestFailed(request_id=""):
                log.warning("worker %s reported: %s (%s)", self.worker_id, message.message, message.code.value)
            case RequestFailed():
                if self.current and message.request_id == self.current.internal_id:
                    self.current.deliver(message)
            case GenerationFinished():
                self.kv_tokens = message.kv_tokens
                if self.current and message.request_id == self.current.internal_id:
                    self.current.deliver(message)
                    self._next()

    def _on_hello(self, hello: Hello) -> None:
        if hello.protocol_version != PROTOCOL_VERSION or hello.role is not Role.WORKER:
            self.send(
                RequestFailed(
                    code=ErrorCode.PROTOCOL_MISMATCH,
                    message=f"supervisor speaks protocol {PROTOCOL_VERSION} to workers; "
                    f"got {hello.role.value} protocol {hello.protocol_version}",
                )
            )
            return
        self.state = WorkerState.LOADING
        self.send(HelloAccepted(protocol_version=PROTOCOL_VERSION, supervisor_pid=os.getpid()))

    # --- exit -------------------------------------------------------------

    def on_exit(self, returncode: int) -> None:
        stopping = self.state is WorkerState.STOPPING
        self.state = WorkerState.DEAD
        tail = "\n".join(self.stderr_tail)
        report = f"worker for {self.name} (pid {self.pid}) {describe_exit(returncode)}"
        if tail:
            report += f"; last stderr lines:\n{tail}"
        if not self.ready.done():
            self.ready.set_exception(ModelSourceError(f"model {self.name} failed to load: {report}"))
        code = ErrorCode.SHUTTING_DOWN if stopping else ErrorCode.WORKER_DIED
        if self.killed_as_hung:
            code = ErrorCode.WORKER_UNRESPONSIVE
        for generation in [self.current, *self.queue]:
            if generation is not None:
                generation.fail(code, report, retryable=not stopping)
        self.current = None
        self.queue.clear()
        if not self.exited.done():
            self.exited.set_result(returncode)


class WorkerPool:
    """Spawns workers and maps their socket identities to handles."""

    def __init__(self, *, config: SupervisorConfig, layout: HomeLayout, send: SendToWorker) -> None:
        self._config = config
        self._layout = layout
        self._send = send
        self._by_identity: dict[bytes, WorkerHandle] = {}
        self._counter = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def handles(self) -> list[WorkerHandle]:
        return list(self._by_identity.values())

    def by_identity(self, identity: bytes) -> WorkerHandle | None:
        return self._by_identity.get(identity)

    async def spawn(
        self, *, name: str, model_path: Path, n_ctx: int, threads: int, engine: str = "llama"
    ) -> WorkerHandle:
        self._counter += 1
        handle = WorkerHandle(
            worker_id=f"w{os.getpid()}-{self._counter}",
            name=name,
            model_path=model_path,
            n_ctx=n_ctx,
            threads=threads,
            send=self._send,
            config=self._config,
        )
        argv = [
            sys.executable, "-m", "bastion.worker",
            "--endpoint", self._layout.workers_endpoint,
            "--worker-id", handle.worker_id,
            "--name", name,
            "--model-path", str(model_path),
            "--n-ctx", str(n_ctx),
            "--threads", str(threads),
            "--parent-pid", str(os.getpid()),
            "--engine", engine,
            "--heartbeat-interval", str(self._config.heartbeat_interval_s),
            "--kv-ram-bytes", str(self._config.kv_ram_bytes),
            "--kv-dir", str(self._layout.kv_dir) if self._config.kv_disk_bytes > 0 else "",
            "--kv-disk-bytes", str(self._config.kv_disk_bytes),
        ]  # fmt: skip
        handle.process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._by_identity[handle.identity] = handle  # only once there is a process to watch
        log.info("spawned worker %s for %s (pid %d)", handle.worker_id, name, handle.pid)
        self._watch(handle)
        return handle

    def _watch(self, handle: WorkerHandle) -> None:
        log_path = self._layout.logs_dir / f"worker-{handle.name}.log"
        stderr_done = asyncio.get_running_loop().create_future()

        async def read_stderr() -> None:
            assert handle.process and handle.process.stderr
            with open(log_path, "a", encoding="utf-8", errors="replace") as log_file:
                while line := await handle.process.stderr.readline():
                    text = line.decode(errors="replace").rstrip()
                    handle.stderr_tail.append(text)
                    log_file.write(f"[{handle.pid}] {text}\n")
                    log_file.flush()
            stderr_done.set_result(None)

        async def wait_exit() -> None:
            assert handle.process
            returncode = await handle.process.wait()
            # The last stderr lines say why it died; give the pipe a moment to drain.
            try:
                await asyncio.wait_for(asyncio.shield(stderr_done), 2.0)
            except TimeoutError:
                pass
            level = logging.INFO if handle.state is WorkerState.STOPPING else logging.ERROR
            log.log(level, "worker %s (%s) %s", handle.worker_id, handle.name, describe_exit(returncode))
            handle.on_exit(returncode)
            self._by_identity.pop(handle.identity, None)

        for coro in (read_stderr(), wait_exit()):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def heartbeat(self, seq: int) -> None:
        now = time.monotonic()
        for handle in self.handles():
            if handle.state is WorkerState.DEAD or handle.state is WorkerState.STARTING:
                continue
            handle.send(Heartbeat(seq=seq))
            silent = now - handle.last_seen
            if silent > self._config.worker_silence_limit_s and handle.process:
                log.error("worker %s silent for %.0f s; killing it", handle.worker_id, silent)
                handle.stderr_tail.append(f"(bastion: no heartbeat for {silent:.0f} s; killed as hung)")
                handle.killed_as_hung = True
                with contextlib.suppress(ProcessLookupError):
                    handle.process.kill()

    async def stop(
        self, handle: WorkerHandle, code: ErrorCode = ErrorCode.SHUTTING_DOWN, reason: str = "the supervisor is stopping"
    ) -> None:
        """Stop one worker: ask, then SIGTERM, then SIGKILL. Its generations
        fail first with `code` (retryable): a stopped model is not a cancel."""
        if handle.exited.done():
            return
        for generation in [*handle.queue, handle.current]:
            if generation is not None:
                generation.fail(code, reason, retryable=True)
        handle.queue.clear()
        if handle.current is not None:
            handle.cancel(handle.current)  # so the worker stops computing at once
        handle.state = WorkerState.STOPPING
        handle.send(Shutdown())
        for escalate in (None, signal.SIGTERM, signal.SIGKILL):
            if escalate is not None and handle.process and handle.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    handle.process.send_signal(escalate)
            try:
                await asyncio.wait_for(asyncio.shield(handle.exited), self._config.stop_grace_s)
                return
            except TimeoutError:
                log.warning("worker %s did not stop; escalating", handle.worker_id)

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(handle) for handle in self.handles()))

    async def stop_unstarted(self, handle: WorkerHandle) -> None:
        """Stop a worker that never became ready (its load failed or timed out)."""
        await self.stop(handle, ErrorCode.MODEL_LOAD_FAILED, f"model {handle.name} did not load")
