"""Tool sandbox processes as the supervisor sees them.

`SandboxPool` starts `python -m bastion.tools_sandbox` on first use, answers
its hello, keeps the confinement report it sends when ready, and sends it tool
calls. A call is an awaitable `ToolEnvelope`; shell output chunks reach the
caller while the call runs. If the sandbox process dies, its calls end with
`ok=False` saying so, and the next call starts a fresh sandbox. Tools never
run in this process: this module only talks to the one that runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from bastion.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    ErrorCode,
    Heartbeat,
    Hello,
    HelloAccepted,
    HomeLayout,
    RequestFailed,
    Role,
    Shutdown,
)
from bastion.protocol.sandbox_wire import (
    ConfinementLevel,
    ConfinementReport,
    FromSandbox,
    RunTool,
    SandboxedArgs,
    SandboxReady,
    ToolChunk,
    ToolEnvelope,
    ToolFinished,
    ToolLimits,
    ToolStream,
    ToSandbox,
)
from bastion.supervisor.errors import SandboxUnavailableError

log = logging.getLogger(__name__)

SendToSandbox = Callable[[bytes, ToSandbox], None]
ChunkCallback = Callable[[ToolStream, str], None]

_READY_TIMEOUT_S = 30.0


class _PendingCall:
    def __init__(self, on_chunk: ChunkCallback | None) -> None:
        self.on_chunk = on_chunk
        self.result: asyncio.Future[ToolEnvelope] = asyncio.get_running_loop().create_future()


class _Sandbox:
    def __init__(self, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        self.identity = sandbox_id.encode()
        self.process: asyncio.subprocess.Process | None = None
        self.ready: asyncio.Future[ConfinementReport] = asyncio.get_running_loop().create_future()
        self.calls: dict[str, _PendingCall] = {}
        self.stderr_tail: deque[str] = deque(maxlen=20)


class SandboxPool:
    def __init__(self, *, layout: HomeLayout, send: SendToSandbox) -> None:
        self._layout = layout
        self._send = send
        self._sandbox: _Sandbox | None = None
        self._starting: asyncio.Task[_Sandbox] | None = None
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self.report: ConfinementReport | None = None

    # --- calls ------------------------------------------------------------

    async def run_tool(
        self,
        request_id: str,
        arguments: SandboxedArgs,
        *,
        workspace: str,
        limits: ToolLimits = ToolLimits(),
        required_level: ConfinementLevel = ConfinementLevel.MINIMAL,
        writable: bool = False,
        on_chunk: ChunkCallback | None = None,
        cancelled: asyncio.Event | None = None,
    ) -> ToolEnvelope:
        sandbox = await self._ensure()
        call = _PendingCall(on_chunk)
        sandbox.calls[request_id] = call
        self._send(sandbox.identity, RunTool(request_id=request_id, arguments=arguments, workspace=workspace,
                                             limits=limits, required_level=required_level, writable=writable))
        waiter = asyncio.ensure_future(cancelled.wait()) if cancelled else None
        try:
            if waiter is not None:
                racers: set[asyncio.Future[Any]] = {call.result, waiter}
                await asyncio.wait(racers, return_when=asyncio.FIRST_COMPLETED)
                if not call.result.done():
                    self._send(sandbox.identity, Cancel(request_id=request_id))
            return await call.result
        finally:
            if waiter is not None:
                waiter.cancel()
            sandbox.calls.pop(request_id, None)

    async def diagnose(self) -> ConfinementReport:
        sandbox = await self._ensure()
        return await asyncio.shield(sandbox.ready)

    # --- messages ---------------------------------------------------------

    def on_message(self, identity: bytes, message: FromSandbox) -> None:
        sandbox = self._sandbox
        if sandbox is None or identity != sandbox.identity:
            log.warning("dropped a message from unknown sandbox %r", identity)
            return
        match message:
            case Hello(protocol_version=version, role=role):
                if version != PROTOCOL_VERSION or role is not Role.SANDBOX:
                    self._send(identity, RequestFailed(code=ErrorCode.PROTOCOL_MISMATCH,
                                                       message=f"supervisor speaks protocol {PROTOCOL_VERSION}"))
                    return
                self._send(identity, HelloAccepted(protocol_version=PROTOCOL_VERSION, supervisor_pid=os.getpid()))
            case SandboxReady(report=report):
                self.report = report
                if not sandbox.ready.done():
                    sandbox.ready.set_result(report)
                log.info("sandbox %s ready: confinement %s", sandbox.sandbox_id, report.level.value)
            case ToolChunk(request_id=request_id, stream=stream, text=text):
                call = sandbox.calls.get(request_id)
                if call is not None and call.on_chunk is not None:
                    call.on_chunk(stream, text)
            case ToolFinished(request_id=request_id, envelope=envelope):
                call = sandbox.calls.get(request_id)
                if call is not None and not call.result.done():
                    call.result.set_result(envelope)
            case RequestFailed(request_id=request_id, message=text) if request_id:
                call = sandbox.calls.get(request_id)
                if call is not None and not call.result.done():
                    call.result.set_result(ToolEnvelope(ok=False, content=text))
            case RequestFailed(message=text):
                log.warning("sandbox %s reported: %s", sandbox.sandbox_id, text)
            case Heartbeat():
                pass

    def heartbeat(self, seq: int) -> None:
        if self._sandbox is not None and self._sandbox.ready.done():
            self._send(self._sandbox.identity, Heartbeat(seq=seq))

    # --- the process ------------------------------------------------------

    async def _ensure(self) -> _Sandbox:
        if self._sandbox is not None and self._sandbox.ready.done() and not self._sandbox.ready.exception():
            return self._sandbox
        if self._starting is None or self._starting.done():
            self._starting = asyncio.create_task(self._start())
        return await asyncio.shield(self._starting)

    async def _start(self) -> _Sandbox:
        sandbox = _Sandbox(f"s{os.getpid()}-{next(self._ids)}")
        self._sandbox = sandbox
        sandbox.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bastion.tools_sandbox", "--endpoint", self._layout.tools_endpoint,
            "--sandbox-id", sandbox.sandbox_id, "--parent-pid", str(os.getpid()),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._watch(sandbox)
        try:
            await asyncio.wait_for(asyncio.shield(sandbox.ready), _READY_TIMEOUT_S)
        except TimeoutError:
            raise SandboxUnavailableError(
                f"the tool sandbox did not start within {_READY_TIMEOUT_S:.0f} s; see logs/sandbox.log"
            ) from None
        return sandbox

    def _watch(self, sandbox: _Sandbox) -> None:
        async def read_stderr() -> None:
            assert sandbox.process and sandbox.process.stderr
            with open(self._layout.logs_dir / "sandbox.log", "a", encoding="utf-8", errors="replace") as log_file:
                while line := await sandbox.process.stderr.readline():
                    text = line.decode(errors="replace").rstrip()
                    sandbox.stderr_tail.append(text)
                    log_file.write(f"[{sandbox.process.pid}] {text}\n")
                    log_file.flush()

        async def wait_exit() -> None:
            assert sandbox.process
            code = await sandbox.process.wait()
            tail = "\n".join(sandbox.stderr_tail)
            message = f"the tool sandbox (pid {sandbox.process.pid}) exited with {code}"
            if not sandbox.ready.done():
                sandbox.ready.set_exception(SandboxUnavailableError(f"{message} while starting:\n{tail}"))
            for call in sandbox.calls.values():
                if not call.result.done():
                    call.result.set_result(ToolEnvelope(ok=False, content=f"{message}; the call did not finish"))
            if self._sandbox is sandbox:
                self._sandbox = None

        for coro in (read_stderr(), wait_exit()):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        sandbox = self._sandbox
        if sandbox is None or sandbox.process is None or sandbox.process.returncode is not None:
            return
        self._send(sandbox.identity, Shutdown())
        try:
            await asyncio.wait_for(sandbox.process.wait(), 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                sandbox.process.kill()
            await sandbox.process.wait()
