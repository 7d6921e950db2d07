"""Watching one running confined call: its pipes, its deadline, its cancel flag.

Owns the read loop and `Outcome`, what the launcher turns into an envelope.
Reads never block past the deadline; output is capped as it arrives; when the
child has exited but something still holds its pipes (only possible when no
PID namespace is active), the rest of the group is killed after a short grace
instead of waiting for EOF. Every exit path kills the child's process group
before reaping, then waits for the call's pid 1 (see status.py) to be gone:
bwrap's own process may exit while its pid 1 is still tearing the namespace
down, and the call is not over until nothing of it runs.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from bastion.protocol.sandbox_wire import ToolEnvelope, ToolStream, TruncationReason
from bastion.tools_sandbox.confine.job import ConfinedJob, OutputMode
from bastion.tools_sandbox.confine.output import CappedOutput, ChunkSink, ChunkStream
from bastion.tools_sandbox.confine.spec import STATUS_EXEC, STATUS_EXEC_FAILED, STATUS_REFUSED
from bastion.tools_sandbox.confine.status import StatusReader

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often the cancel flag and the deadline are looked at
DRAIN_S = 0.5  # grace for the pipes to close after the child exited or was killed
TEARDOWN_S = 5.0  # the kernel killing a PID namespace takes milliseconds; this is only a bound
_READ = 1 << 16
_ENVELOPE_SLACK = 1 << 16  # msgpack framing around a tool's already-capped content


@dataclass(frozen=True, slots=True)
class Outcome:
    exit_code: int | None  # 128+N when killed by signal N
    killed_for: TruncationReason | None  # TIMEOUT or CANCELLED
    refusal: str | None  # the wall did not go up: the tool never ran
    exec_error: str | None
    output: CappedOutput  # TEXT: stdout+stderr in arrival order; ENVELOPE: stderr
    stdout: CappedOutput | None  # ENVELOPE only
    timeout_s: float

    @property
    def output_truncated(self) -> bool:
        return self.output.truncated

    def text(self) -> str:
        output = self.output.render()
        parts: list[str] = []
        if self.exec_error:
            parts.append(f"[bastion: {self.exec_error}]")
        if self.killed_for is TruncationReason.TIMEOUT:
            parts.append(f"[bastion: timed out after {self.timeout_s:g} s; every process of the call was killed]")
        elif self.killed_for is TruncationReason.CANCELLED:
            parts.append("[bastion: cancelled; every process of the call was killed]")
        elif self.exit_code is not None and 128 < self.exit_code <= 128 + 64:
            parts.append(f"[bastion: the tool was killed by {_signal_name(self.exit_code - 128)}]")
        if not parts:
            return output
        return output + ("" if not output or output.endswith("\n") else "\n") + "\n".join(parts)

    def tool_envelope(self, duration_ms: float) -> ToolEnvelope:
        """ENVELOPE mode: the msgpack ToolEnvelope the tool wrote on stdout."""
        raw = self.stdout.raw() if self.stdout is not None and not self.stdout.truncated else b""
        try:
            envelope = msgspec.msgpack.decode(raw, type=ToolEnvelope)
        except msgspec.DecodeError:
            detail = self.text() or "no output"
            return ToolEnvelope(ok=False, exit_code=self.exit_code, duration_ms=duration_ms,
                                content=f"the tool returned no result (exit {self.exit_code}): {detail}")  # fmt: skip
        return msgspec.structs.replace(envelope, duration_ms=duration_ms)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def watch(process: subprocess.Popen[bytes], status_fd: int, job: ConfinedJob, *, on_chunk: ChunkSink | None,
          cancelled: Callable[[], bool], deadline: float) -> Outcome:  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    cap = job.limits.max_output_bytes
    text_mode = job.output is OutputMode.TEXT
    output = CappedOutput(cap)
    stdout = None if text_mode else CappedOutput(2 * cap + _ENVELOPE_SLACK)
    stream = ChunkStream(on_chunk if text_mode else None, cap)
    status = StatusReader()
    exit_fd = os.pidfd_open(process.pid)  # readable once the child exits; no polling for it
    selector = selectors.DefaultSelector()
    selector.register(process.stdout.fileno(), selectors.EVENT_READ, ToolStream.STDOUT)
    selector.register(process.stderr.fileno(), selectors.EVENT_READ, ToolStream.STDERR)
    selector.register(status_fd, selectors.EVENT_READ, status)
    selector.register(exit_fd, selectors.EVENT_READ, process)
    killed_for: TruncationReason | None = None
    ended_at: float | None = None  # exited, or killed by us
    try:
        while True:
            now = time.monotonic()
            if killed_for is None and ended_at is None:
                if cancelled():
                    killed_for = TruncationReason.CANCELLED
                elif now >= deadline:
                    killed_for = TruncationReason.TIMEOUT
                if killed_for is not None:
                    kill_group(process)
                    ended_at = now
            pipes_open = any(key.data is not process for key in selector.get_map().values())
            if ended_at is not None and (not pipes_open or now - ended_at > DRAIN_S):
                break
            for key, _ in selector.select(POLL_S):
                if key.data is process:
                    selector.unregister(exit_fd)
                    ended_at = ended_at or time.monotonic()
                    continue
                data = os.read(key.fd, _READ)
                if not data:
                    selector.unregister(key.fd)
                elif key.data is status:
                    status.feed(data)
                elif key.data is ToolStream.STDOUT and stdout is not None:
                    stdout.feed(data)
                else:
                    output.feed(data)
                    stream.feed(key.data, data)
    finally:
        selector.close()
        # The zombie (reaped only below) keeps its pid, and so the group id, from being reused before this.
        kill_group(process)
        process.wait()
        os.close(exit_fd)
        process.stdout.close()
        process.stderr.close()
        if not status.wait_for_init(TEARDOWN_S):
            log.error("pid 1 of a confined call (child of %d) outlived its kill by %s s", process.pid, TEARDOWN_S)
    stream.close()
    return _outcome(process, status.lines, killed_for, output, stdout, job)


def _outcome(process: subprocess.Popen[bytes], lines: list[str], killed_for: TruncationReason | None,
             output: CappedOutput, stdout: CappedOutput | None, job: ConfinedJob) -> Outcome:  # fmt: skip
    started = STATUS_EXEC in lines
    refusal = next((line.partition(" ")[2] for line in lines if line.startswith(STATUS_REFUSED + " ")), None)
    exec_error = next((line.partition(" ")[2] for line in lines if line.startswith(STATUS_EXEC_FAILED + " ")), None)
    code = process.returncode
    exit_code = code if code >= 0 else 128 - code
    if refusal is None and not started and killed_for is None:
        said = output.render().strip() or "nothing"
        refusal = f"the confined child exited with {exit_code} before starting the tool; it said: {said}"
    return Outcome(exit_code=exit_code, killed_for=killed_for, refusal=refusal, exec_error=exec_error,
                   output=output, stdout=stdout, timeout_s=job.limits.timeout_s)  # fmt: skip
