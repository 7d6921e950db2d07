"""One model worker process as the supervisor sees it: `WorkerHandle`.

Its state, what it reported when ready, the tail of its stderr, the
generations it is serving (up to its `parallel` setting: one per KV sequence,
decoded together) and a bounded queue of generations waiting for it, and what
it was started with (`WorkerLaunch`, so a restart starts the next one the same
way). It turns the worker's messages into state and hands each generation's
messages to that generation. The worker keeps each sequence's KV state warm
for the next generation that shares its prefix. Spawning,
watching and stopping workers is `WorkerPool`'s (workers.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import msgspec

from bastion.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    ErrorCode,
    GenerationStats,
    Heartbeat,
    Hello,
    HelloAccepted,
    KvCacheType,
    RequestFailed,
    Role,
    StopReason,
    TokenDelta,
    TokenLogprobs,
    WorkerState,
)
from bastion.protocol.remote import BackendGauge, RemoteEndpoint
from bastion.protocol.worker_wire import (
    CountTokens,
    FromWorker,
    Generate,
    GenerationFinished,
    ModelDescription,
    SetThreads,
    TokenCount,
    ToWorker,
    WorkerLoadFailed,
    WorkerReady,
)
from bastion.supervisor.config import SupervisorConfig
from bastion.supervisor.errors import InvalidModelFileError, ModelSourceError, QueueFullError, SupervisorError
from bastion.supervisor.processes.liveness import failure_line
from bastion.supervisor.runs import Generation

log = logging.getLogger(__name__)

SendToWorker = Callable[[bytes, ToWorker], None]


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


class CountFailed(Exception):
    """A worker could not count a text's tokens: its remote has no tokenizer route, or (retryable) the
    server could not be asked just now, or the worker died."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class WorkerLaunch(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker was started with; a restart starts the next one the same way."""

    name: str
    model_path: Path
    n_ctx: int
    threads: int
    engine: str = "llama"
    flash_attn: bool = True
    kv_cache_type: KvCacheType = KvCacheType.F16
    parallel: int = 1  # generations decoded together, each with n_ctx positions
    kv_ram_bytes: int = 0
    kv_disk_bytes: int = 0
    remote: RemoteEndpoint | None = None  # with engine "remote": the engine it streams from


class WorkerHandle:
    def __init__(
        self,
        *,
        worker_id: str,
        launch: WorkerLaunch,
        send: SendToWorker,
        config: SupervisorConfig,
    ) -> None:
        self.worker_id = worker_id
        self.identity = worker_id.encode()
        self.launch = launch
        self.name = launch.name
        self.model_path = launch.model_path
        self.n_ctx = launch.n_ctx
        self.threads = launch.threads
        self.state = WorkerState.STARTING
        self.process: asyncio.subprocess.Process | None = None
        self.description: ModelDescription | None = None
        self.ready: asyncio.Future[ModelDescription] = asyncio.get_running_loop().create_future()
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.stderr_tail: deque[str] = deque(maxlen=config.stderr_tail_lines)
        # Generations the worker serves now, by internal id, in the order they started.
        self.running: dict[str, Generation] = {}
        self.queue: deque[Generation] = deque()
        self.last_seen = time.monotonic()
        self.kv_tokens = 0
        self.progress = 0
        # When `progress` last moved, or the current generation started if later.
        self.progress_at = self.last_seen
        self.snapshots_ram = 0
        self.snapshot_ram_bytes = 0
        self.snapshots_disk = 0
        self.snapshot_disk_bytes = 0
        self.backends: tuple[BackendGauge, ...] = ()  # a remote model's servers, as its worker last said
        self.template_source = ""
        self.killed_as_hung = False
        self.hang_reason = ""
        # Set by `WorkerPool.stop`: the exit that follows was asked for, not a crash.
        self.stop_requested = False
        # After the exit: how it ended and the last thing it said, in one line
        # (warnings and `bastion ps` quote it).
        self.exit_line = ""
        self.load_error = ""  # what a WorkerLoadFailed said
        # Threads the worker decodes with now (it starts with its launch
        # setting; SetThreads changes it), and who to tell when it starts or
        # stops generating (the pool shares the cores among busy workers).
        self.applied_threads = launch.threads
        self.on_activity: Callable[[], None] = lambda: None
        self._counts: dict[str, asyncio.Future[int]] = {}  # CountTokens asked, by request id
        # Whether its (remote) model's server counts tokens; None until asked.
        self.counts_tokens: bool | None = None
        self._counted = 0
        self._send = send
        self._config = config

    @property
    def current(self) -> Generation | None:
        """The longest-running generation in flight, if any."""
        return next(iter(self.running.values()), None)

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    def send(self, message: ToWorker) -> None:
        self._send(self.identity, message)

    async def count_tokens(self, text: str, timeout_s: float = 30.0) -> int:
        """`text`'s tokens as the worker's model counts a prompt (a remote model: its server's own
        tokenizer); CountFailed when it cannot say."""
        if self.state not in (WorkerState.IDLE, WorkerState.BUSY):
            raise CountFailed(f"model {self.name} is {self.state.value}")
        self._counted += 1
        request_id = f"count-{self._counted}"
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._counts[request_id] = answer
        try:
            self.send(CountTokens(request_id=request_id, text=text))
            return await asyncio.wait_for(answer, timeout_s)
        except TimeoutError:
            raise CountFailed(f"model {self.name}'s worker did not count within {timeout_s:g} s",
                              retryable=True) from None
        finally:
            self._counts.pop(request_id, None)

    # --- runs -------------------------------------------------------------

    def submit(self, generation: Generation) -> None:
        """Start generation `generation` now if the worker has a free sequence, else queue it (bounded)."""
        if self.state not in (WorkerState.IDLE, WorkerState.BUSY):
            raise SupervisorError(f"model {self.name} is {self.state.value}, not serving")
        if len(self.running) < self.launch.parallel and not self.queue:
            self._start(generation)
            return
        if len(self.queue) >= self._config.max_queued_per_worker:
            raise QueueFullError(
                f"model {self.name} has {len(self.queue)} requests waiting; try again shortly"
            )
        self.queue.append(generation)

    def cancel(self, generation: Generation) -> None:
        if self.running.get(generation.internal_id) is generation:
            self.send(Cancel(request_id=generation.internal_id))
        elif generation in self.queue:
            self.queue.remove(generation)
            generation.deliver(GenerationFinished(request_id=generation.internal_id, stop_reason=StopReason.CANCELLED,
                                           completion_tokens=0, kv_tokens=self.kv_tokens))

    def _start(self, generation: Generation) -> None:
        first = not self.running
        self.running[generation.internal_id] = generation
        self.state = WorkerState.BUSY
        if first:
            self.progress_at = time.monotonic()
            self.on_activity()  # the cores are shared anew before it starts
        self.send(
            Generate(
                request_id=generation.internal_id,
                session_id=generation.session_id,
                prompt=generation.prompt,
                sampling=generation.sampling,
                snapshot=generation.snapshot,
                grammar=generation.grammar,
            )
        )

    def _next(self, finished: str) -> None:
        self.running.pop(finished, None)
        if self.state is WorkerState.BUSY and not self.running:
            self.state = WorkerState.IDLE
        while self.queue and self.state in (WorkerState.IDLE, WorkerState.BUSY) \
                and len(self.running) < self.launch.parallel:
            generation = self.queue.popleft()
            if not generation.done:
                self._start(generation)
        if not self.running:
            self.on_activity()

    def set_threads(self, threads: int) -> None:
        """Ask the worker to decode with `threads` threads from its next step."""
        if threads != self.applied_threads:
            self.send(SetThreads(threads=threads))
            self.applied_threads = threads

    # --- messages from the worker -----------------------------------------

    def on_message(self, message: FromWorker) -> None:
        self.last_seen = time.monotonic()
        match message:
            case Hello():
                self._on_hello(message)
            case WorkerReady(model=description):
                self.description = description
                if not self.launch.n_ctx:  # a remote model's: the server said its own
                    self.n_ctx = description.n_ctx
                if self.state is WorkerState.LOADING:  # never revive a worker being stopped
                    self.state = WorkerState.IDLE
                if not self.ready.done():
                    self.ready.set_result(description)
                log.info("worker %s (%s, pid %d) ready in %.0f ms", self.worker_id, self.name, self.pid,
                         description.load_ms)
            case WorkerLoadFailed(code=code, message=text):
                self.load_error = text
                error_type = InvalidModelFileError if code is ErrorCode.INVALID_MODEL_FILE else ModelSourceError
                if not self.ready.done():
                    self.ready.set_exception(error_type(f"{self.name}: {text}"))
            case Heartbeat():
                self.kv_tokens = message.kv_tokens
                if message.progress != self.progress:
                    self.progress = message.progress
                    self.progress_at = self.last_seen
                self.snapshots_ram = message.snapshots_ram
                self.snapshot_ram_bytes = message.snapshot_ram_bytes
                self.snapshots_disk = message.snapshots_disk
                self.snapshot_disk_bytes = message.snapshot_disk_bytes
                self.backends = message.backends
            case TokenDelta() | TokenLogprobs() | GenerationStats():
                if (generation := self.running.get(message.request_id)) is not None:
                    generation.deliver(message)
            case RequestFailed(request_id=""):
                log.warning("worker %s reported: %s (%s)", self.worker_id, message.message, message.code.value)
            case TokenCount(request_id=request_id, count=count):
                if (answer := self._counts.get(request_id)) is not None and not answer.done():
                    answer.set_result(count)
            case RequestFailed() if message.request_id in self._counts:
                if not (answer := self._counts[message.request_id]).done():
                    answer.set_exception(CountFailed(message.message, retryable=message.retryable))
            case RequestFailed():
                if (generation := self.running.get(message.request_id)) is not None:
                    generation.deliver(message)
            case GenerationFinished():
                self.kv_tokens = message.kv_tokens
                if (generation := self.running.get(message.request_id)) is not None:
                    generation.deliver(message)
                    self._next(message.request_id)

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
        how = f"was killed as hung ({self.hang_reason})" if self.killed_as_hung else describe_exit(returncode)
        self.exit_line = failure_line(f"worker for {self.name} (pid {self.pid}) {how}", list(self.stderr_tail))
        report = f"{self.exit_line}\nlast stderr lines:\n{tail}" if tail else self.exit_line
        if not self.ready.done():
            self.ready.set_exception(ModelSourceError(f"model {self.name} failed to load: {report}"))
        code = ErrorCode.SHUTTING_DOWN if stopping else ErrorCode.WORKER_DIED
        if self.killed_as_hung:
            code = ErrorCode.WORKER_UNRESPONSIVE
        for generation in [*self.running.values(), *self.queue]:
            generation.fail(code, report, retryable=not stopping)
        for answer in self._counts.values():
            if not answer.done():
                answer.set_exception(CountFailed(self.exit_line))
        self.running.clear()
        self.queue.clear()
        self.on_activity()  # its share of the cores goes to the others
        if not self.exited.done():
            self.exited.set_result(returncode)
