"""The supervisor in-process, wired exactly as the daemon wires it, with its
child processes stood in for: no processes, no sockets, milliseconds a run.

- `InProcessWorkers` stands in for `WorkerPool`: real `WorkerHandle`s whose
  worker is the worker package's own `WorkerCore` over the engine the worker
  process would build (`engine_factory`: scripted replies for
  `scripted:FILE`), run on a thread, its messages handed to the handle on the
  event loop as the daemon would. `crash` kills one like a SIGSEGV.
- `FakeSandbox` stands in for `SandboxPool`: it reports a confinement level
  and answers each call with what the test says; it runs nothing.
- `InProcessSupervisor` is `daemon.compose` over those, with a real home,
  session store, approvals and audit log in a temporary directory. A test
  sends it typed requests and reads the typed events each one gets.

Every capability driven here also has an end-to-end test through the real
processes (tests marked `e2e`).
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from bastion.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    ErrorCode,
    Hello,
    HomeLayout,
    RequestFailed,
    Role,
    SamplingParams,
    TokenDelta,
    WorkerState,
)
from bastion.protocol.control import ControlEvent, ControlRequest, Run, RunFinished
from bastion.protocol.sandbox_wire import (
    ConfinementLevel,
    ConfinementReport,
    SandboxedArgs,
    ToolEnvelope,
    ToolStream,
)
from bastion.protocol.worker_wire import Generate, ModelDescription, ToWorker, WorkerReady
from bastion.supervisor.config import SupervisorConfig
from bastion.supervisor.core import Supervisor
from bastion.supervisor.daemon import compose
from bastion.supervisor.models.loaded import LoadedModels
from bastion.supervisor.models.registry import RegistryWatcher
from bastion.supervisor.models.tokenizer import TokenCounters
from bastion.supervisor.processes.worker_handle import WorkerHandle, WorkerLaunch
from bastion.supervisor.store.sessions import SessionStore, database_path
from bastion.supervisor.trust.approvals import ApprovalStore
from bastion.supervisor.trust.audit import AuditLog
from bastion.worker.__main__ import engine_factory
from bastion.worker.config import EngineKind, WorkerConfig
from bastion.worker.core import WorkerCore
from tests.scripted import script, tool_call

__all__ = ["FakeSandbox", "InProcessSupervisor", "InProcessWorkers", "failure_of", "script", "tool_call",
           "types_of"]


class _InProcessWorker:
    """The worker side of one handle: a WorkerCore on a thread per generation."""

    def __init__(self, handle: WorkerHandle, loop: asyncio.AbstractEventLoop, token_delay: float) -> None:
        config = WorkerConfig(endpoint="inproc://none", worker_id=handle.worker_id, name=handle.name,
                              model_path=str(handle.model_path), n_ctx=handle.n_ctx, threads=1,
                              engine=EngineKind(handle.launch.engine))
        engine = engine_factory(config)()
        if token_delay:  # slow decoding, so a cancel has something to interrupt
            engine._config = msgspec.structs.replace(engine._config, token_delay=token_delay)
        self.core = WorkerCore(engine)
        self.handle = handle
        self.loop = loop
        self.cancelled: set[str] = set()
        self.dead = False
        self.threads: list[threading.Thread] = []
        self.prompts: list[str] = []  # every prompt it was asked to complete, in order
        self.samplings: list[SamplingParams] = []  # and the sampling each was asked with
        # Called instead of generating, when set (e.g. to crash the worker the moment it is asked).
        self.on_generate: Callable[[WorkerHandle], None] | None = None

    def receive(self, message: ToWorker) -> None:
        match message:
            case Generate() if self.on_generate is not None:
                self.on_generate(self.handle)
            case Generate(request_id=request_id):
                self.prompts.append(message.prompt)
                self.samplings.append(message.sampling)
                thread = threading.Thread(target=self._generate, args=(message,), name=f"gen-{request_id}")
                self.threads.append(thread)
                thread.start()
            case Cancel(request_id=request_id):
                self.cancelled.add(request_id)
            case _:
                pass  # heartbeats, thread counts, shutdown: nothing to do without a process

    def _generate(self, request: Generate) -> None:
        def emit(message: object) -> None:
            if not self.dead:
                self.loop.call_soon_threadsafe(self._deliver, message)

        self.core.generate(request, emit, lambda: self.dead or request.request_id in self.cancelled)

    def _deliver(self, message: object) -> None:
        if not self.dead and not self.handle.exited.done():
            self.handle.on_message(message)  # type: ignore[arg-type]


class InProcessWorkers:
    """Stands in for `WorkerPool` (see the module docstring)."""

    def __init__(self, config: SupervisorConfig, *, token_delay: float = 0.0) -> None:
        self._config = config
        self.token_delay = token_delay
        self.started: list[WorkerHandle] = []
        self._workers: dict[bytes, _InProcessWorker] = {}

    async def spawn(self, **launch: object) -> WorkerHandle:
        fields = {k: v for k, v in launch.items() if k in WorkerLaunch.__struct_fields__}
        return self._start(WorkerLaunch(**fields))  # type: ignore[arg-type]

    async def respawn(self, dead: WorkerHandle) -> WorkerHandle:
        return self._start(dead.launch)

    def _start(self, launch: WorkerLaunch) -> WorkerHandle:
        handle = WorkerHandle(worker_id=f"w{len(self.started) + 1}", launch=launch, send=self._send,
                              config=self._config)
        self.started.append(handle)
        worker = _InProcessWorker(handle, asyncio.get_running_loop(), self.token_delay)
        self._workers[handle.identity] = worker
        handle.on_message(Hello(protocol_version=PROTOCOL_VERSION, role=Role.WORKER))
        info = worker.core._engine.describe()
        handle.on_message(WorkerReady(model=ModelDescription(
            name=launch.name, path=str(launch.model_path), architecture=info.architecture, n_ctx=info.n_ctx,
            n_ctx_train=info.n_ctx_train, n_vocab=info.n_vocab, n_params=info.n_params, threads=1,
            has_chat_template=bool(info.chat_template), chat_template=info.chat_template, bos_token=info.bos_token,
            eos_token=info.eos_token, file_size=0, load_ms=0.1, rss_bytes=0,
        )))  # fmt: skip
        return handle

    def _send(self, identity: bytes, message: ToWorker) -> None:
        worker = self._workers.get(identity)
        if worker is not None and not worker.dead:
            worker.receive(message)

    def grammars(self) -> list[object]:
        """What every generation so far was asked to follow (None: nothing), in order."""
        return [grammar for worker in self._workers.values()
                for grammar in worker.core._engine.grammars]  # type: ignore[attr-defined]

    def prompts(self) -> list[str]:
        """Every prompt the workers were asked to complete, in order."""
        return [prompt for worker in self._workers.values() for prompt in worker.prompts]

    def samplings(self) -> list[SamplingParams]:
        """The sampling of every generation so far, in order."""
        return [sampling for worker in self._workers.values() for sampling in worker.samplings]

    def crash_when_asked(self, handle: WorkerHandle) -> None:
        """The worker dies the moment it receives its next generation, before any token."""
        worker = self._workers[handle.identity]

        def crash(dead: WorkerHandle) -> None:
            worker.on_generate = None
            # After the current message is handled, as a real death would be noticed.
            asyncio.get_running_loop().call_soon(self.crash, dead)

        worker.on_generate = crash

    def crash(self, handle: WorkerHandle) -> None:
        """The worker dies as a SIGSEGV would kill it: at once, mid-generation or not."""
        worker = self._workers[handle.identity]
        worker.dead = True
        handle.stderr_tail.append("Segmentation fault")
        handle.on_exit(-signal.SIGSEGV)

    async def stop(self, handle: WorkerHandle, code: ErrorCode = ErrorCode.SHUTTING_DOWN, reason: str = "") -> None:
        if handle.exited.done():
            return
        handle.stop_requested = True
        for generation in [*handle.queue, *handle.running.values()]:
            generation.fail(code, reason or "stopped", retryable=True)
        handle.queue.clear()
        handle.state = WorkerState.STOPPING
        self._workers[handle.identity].dead = True
        handle.on_exit(0)

    async def stop_unstarted(self, handle: WorkerHandle) -> None:
        await self.stop(handle)

    async def stop_all(self) -> None:
        for handle in list(self.started):
            await self.stop(handle)

    def join(self) -> None:
        for worker in self._workers.values():
            for thread in worker.threads:
                thread.join(timeout=10)


class FakeSandbox:
    """Stands in for `SandboxPool`: a confinement report, and a scripted answer per call."""

    def __init__(self, level: ConfinementLevel = ConfinementLevel.STRONG) -> None:
        self.report = ConfinementReport(level=level, layers=[])
        self.calls: list[tuple[SandboxedArgs, str, bool]] = []  # arguments, workspace, writable
        self.answer: Callable[[SandboxedArgs], ToolEnvelope] = lambda args: ToolEnvelope(ok=True, content="done")
        self.release: asyncio.Event | None = None  # when set, each call waits for it (or the run's cancel)

    async def diagnose(self) -> ConfinementReport:
        return self.report

    async def run_tool(self, request_id: str, arguments: SandboxedArgs, *, workspace: str,
                       writable: bool = False, on_chunk: Callable[[ToolStream, str], None] | None = None,
                       cancelled: asyncio.Event | None = None, **_limits: object) -> ToolEnvelope:
        self.calls.append((arguments, workspace, writable))
        if self.release is not None:
            waits = {asyncio.ensure_future(self.release.wait())}
            if cancelled is not None:
                waits.add(asyncio.ensure_future(cancelled.wait()))
            _done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
        envelope = self.answer(arguments)
        if on_chunk is not None and envelope.content:
            on_chunk(ToolStream.STDOUT, envelope.content)
        return envelope

    async def stop(self) -> None:
        pass


class InProcessSupervisor:
    """`daemon.compose` over stand-in workers and sandbox, with a real home."""

    CLIENT = b"client-1"

    def __init__(self, home: Path, *, config: SupervisorConfig | None = None, token_delay: float = 0.0) -> None:
        self.layout = HomeLayout(home)
        self.layout.ensure()
        self.config = config or SupervisorConfig(restart_backoff_s=0.01, restart_backoff_max_s=0.05)
        self.workers = InProcessWorkers(self.config, token_delay=token_delay)
        self.sandbox = FakeSandbox()
        self.events: list[tuple[bytes, ControlEvent]] = []
        self.listeners: list[Callable[[bytes, ControlEvent], None]] = []  # e.g. an in-process gateway link
        self._arrived = asyncio.Event()
        self.store = SessionStore.open(database_path(self.layout))
        self.approvals = ApprovalStore.open(database_path(self.layout))
        self.audit = AuditLog.open(self.layout.audit_log)
        self.models = LoadedModels(config=self.config, layout=self.layout, pool=self.workers)  # type: ignore[arg-type]
        self.counters = TokenCounters()
        self.core: Supervisor = compose(
            layout=self.layout, registry=RegistryWatcher(self.layout), models=self.models, store=self.store,
            approvals=self.approvals, audit=self.audit, sandboxes=self.sandbox,  # type: ignore[arg-type]
            counters=self.counters, sink=self._sink, request_shutdown=lambda: None,
        )  # fmt: skip
        self.core.on_client_message(self.CLIENT, Hello(protocol_version=PROTOCOL_VERSION, role=Role.CLIENT))

    def _sink(self, client: bytes, event: ControlEvent) -> None:
        self.events.append((client, event))
        self._arrived.set()
        for listener in self.listeners:
            listener(client, event)

    def send(self, request: ControlRequest, client: bytes = CLIENT) -> None:
        self.core.on_client_message(client, request)

    def of(self, request_id: str) -> list[ControlEvent]:
        return [event for _client, event in self.events if getattr(event, "request_id", None) == request_id]

    async def wait_for(self, found: Callable[[], object], timeout: float = 10.0) -> object:
        """Wait until `found()` is truthy (checked after each event), or fail."""
        async with asyncio.timeout(timeout):
            while not (value := found()):
                self._arrived.clear()
                await self._arrived.wait()
            return value

    async def run(self, request: ControlRequest, timeout: float = 10.0) -> list[ControlEvent]:
        """Send a run and return its events once its run_end arrived."""
        self.send(request)
        request_id = request.request_id  # type: ignore[union-attr]
        await self.wait_for(lambda: any(isinstance(e, RunFinished) for e in self.of(request_id)), timeout)
        return self.of(request_id)

    async def ask(self, request: ControlRequest, timeout: float = 10.0) -> ControlEvent:
        """Send a one-answer request and return its answer (or its RequestFailed)."""
        self.send(request)
        request_id = request.request_id  # type: ignore[union-attr]

        def answer() -> ControlEvent | None:
            return next((e for e in self.of(request_id) if not _is_progress(e)), None)

        return await self.wait_for(answer, timeout)  # type: ignore[return-value]

    async def close(self) -> None:
        await self.core.shutdown()
        self.workers.join()
        self.counters.close()
        self.store.close()
        self.approvals.close()
        self.audit.close()


def _is_progress(event: ControlEvent) -> bool:
    return type(event).__name__ in ("LoadProgress", "ApprovalRequired")


@contextmanager
def home_config(home: Path, text: str) -> Iterator[None]:
    """Write the home's config.toml for the duration of a block."""
    path = home / "config.toml"
    path.write_text(text)
    try:
        yield
    finally:
        path.unlink()


def types_of(events: list[ControlEvent], *, skip: tuple[str, ...] = ("token", "load_progress")) -> list[str]:
    """The events' wire tags, in order (tokens and load progress left out by default)."""
    tags = [str(type(event).__struct_config__.tag) for event in events]  # type: ignore[attr-defined]
    return [tag for tag in tags if tag not in skip]


def failure_of(events: list[ControlEvent]) -> RequestFailed | None:
    return next((event for event in events if isinstance(event, RequestFailed)), None)


_request_ids = itertools.count(1)


def request_id(prefix: str = "r") -> str:
    """An id no other request of the test process has."""
    return f"{prefix}{next(_request_ids)}"


def run_request(model: str, prompt: str = "hi", **fields: object) -> Run:
    """A `run` request with an id of its own."""
    return Run(request_id=request_id(), prompt=prompt, model=model, **fields)  # type: ignore[arg-type]


def of_type(events: list, kind: type) -> list:
    return [event for event in events if isinstance(event, kind)]


def streamed(events: list, kind: type = TokenDelta) -> str:
    """The text of the run's `token` events (or of another kind of delta, e.g. reasoning)."""
    return "".join(event.text for event in of_type(events, kind))


def drive(home: Path, test: Callable[[InProcessSupervisor], Awaitable[None]], **options: Any) -> None:
    """Run a test coroutine against a fresh in-process supervisor in `home`, closing it after."""

    async def main() -> None:
        supervisor = InProcessSupervisor(home, **options)
        try:
            await test(supervisor)
        finally:
            await supervisor.close()

    asyncio.run(main())
