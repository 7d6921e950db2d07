"""Model worker processes as the supervisor sees them.

`WorkerPool` spawns `python -m bastion.worker` children, answers their hello,
and watches each one's exit directly (an asyncio task awaits the process), so
a crash is noticed the moment it happens rather than when heartbeats stop.
Each heartbeat tick it also kills workers that count as hung (silent, or busy
without progress; see liveness.py); `respawn` starts a fresh worker exactly
like a dead one, for crash recovery (models/loaded.py decides when).
Each child is a `WorkerHandle` (worker_handle.py).

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
from pathlib import Path

import msgspec

from bastion.protocol import (
    ErrorCode,
    Heartbeat,
    HomeLayout,
    KvCacheType,
    Shutdown,
    WorkerState,
)
from bastion.protocol.remote import RemoteEndpoint
from bastion.supervisor.config import SupervisorConfig
from bastion.supervisor.processes.cores import available_cpus, cpu_sets, pin_process, share_cores
from bastion.supervisor.processes.liveness import hang_reason
from bastion.supervisor.processes.worker_handle import SendToWorker, WorkerHandle, WorkerLaunch, describe_exit

log = logging.getLogger(__name__)

class WorkerPool:
    """Spawns workers and maps their socket identities to handles."""

    def __init__(self, *, config: SupervisorConfig, layout: HomeLayout, send: SendToWorker) -> None:
        self._config = config
        self._layout = layout
        self._send = send
        self._by_identity: dict[bytes, WorkerHandle] = {}
        self._counter = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._cpus = available_cpus()
        self._pinned: set[bytes] = set()

    def handles(self) -> list[WorkerHandle]:
        return list(self._by_identity.values())

    def by_identity(self, identity: bytes) -> WorkerHandle | None:
        return self._by_identity.get(identity)

    async def spawn(
        self, *, name: str, model_path: Path, n_ctx: int, threads: int, engine: str = "llama",
        flash_attn: bool = True, kv_cache_type: KvCacheType = KvCacheType.F16, parallel: int = 1,
        kv_ram_bytes: int | None = None, kv_disk_bytes: int | None = None, remote: RemoteEndpoint | None = None,
    ) -> WorkerHandle:
        launch = WorkerLaunch(
            name=name, model_path=model_path, n_ctx=n_ctx, threads=threads, engine=engine, flash_attn=flash_attn,
            kv_cache_type=kv_cache_type, parallel=parallel, remote=remote,
            kv_ram_bytes=self._config.kv_ram_bytes if kv_ram_bytes is None else kv_ram_bytes,
            kv_disk_bytes=self._config.kv_disk_bytes if kv_disk_bytes is None else kv_disk_bytes,
        )  # fmt: skip
        return await self._spawn(launch)

    async def respawn(self, dead: WorkerHandle) -> WorkerHandle:
        """A fresh worker started exactly as `dead` was (its state is STARTING;
        wait for `ready` as after `spawn`)."""
        return await self._spawn(dead.launch)

    async def _spawn(self, launch: WorkerLaunch) -> WorkerHandle:
        self._counter += 1
        handle = WorkerHandle(
            worker_id=f"w{os.getpid()}-{self._counter}",
            launch=launch,
            send=self._send,
            config=self._config,
        )
        name = launch.name
        argv = [
            sys.executable, "-m", "bastion.worker",
            "--endpoint", self._layout.workers_endpoint,
            "--worker-id", handle.worker_id,
            "--name", name,
            "--model-path", str(launch.model_path),
            "--n-ctx", str(launch.n_ctx),
            "--threads", str(launch.threads),
            "--flash-attn", "on" if launch.flash_attn else "off",
            "--kv-cache-type", launch.kv_cache_type.value,
            "--parallel", str(launch.parallel),
            "--parent-pid", str(os.getpid()),
            "--engine", launch.engine,
            "--heartbeat-interval", str(self._config.heartbeat_interval_s),
            "--kv-ram-bytes", str(launch.kv_ram_bytes),
            "--kv-dir", str(self._layout.kv_dir) if launch.kv_disk_bytes > 0 else "",
            "--kv-disk-bytes", str(launch.kv_disk_bytes),
        ]  # fmt: skip
        if launch.remote is not None:  # no secret in it: only where the key is (protocol/remote.py)
            argv += ["--remote", msgspec.json.encode(launch.remote).decode()]
        handle.process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        handle.on_activity = self.share_cores
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

    def share_cores(self) -> None:
        """Give each generating worker its share of the cores (see cores.py):
        called whenever a worker starts or stops generating."""
        if not self._config.share_cores:
            return
        # A remote model's worker only streams: the cores are the local models'.
        busy = [h for h in self._by_identity.values()
                if h.running and h.state is WorkerState.BUSY and h.launch.remote is None]
        shares = share_cores([h.worker_id for h in busy], len(self._cpus), {h.worker_id: h.threads for h in busy})
        for handle in busy:
            handle.set_threads(shares[handle.worker_id])
        if self._config.pin_cores:
            self._pin(busy, shares)

    def _pin(self, busy: list[WorkerHandle], shares: dict[str, int]) -> None:
        sets = cpu_sets(shares, self._cpus)
        for handle in busy:
            if pin_process(handle.pid, sets[handle.worker_id]):
                self._pinned.add(handle.identity)
        for identity in self._pinned - {h.identity for h in busy}:
            idle = self._by_identity.get(identity)
            if idle is None or pin_process(idle.pid, self._cpus):  # idle again: the whole machine
                self._pinned.discard(identity)

    def heartbeat(self, seq: int) -> None:
        now = time.monotonic()
        for handle in self.handles():
            if handle.state is WorkerState.DEAD or handle.state is WorkerState.STARTING:
                continue
            handle.send(Heartbeat(seq=seq))
            if handle.killed_as_hung or handle.process is None:
                continue
            reason = hang_reason(
                now=now, last_seen=handle.last_seen, busy=handle.state is WorkerState.BUSY,
                progress_at=handle.progress_at, silence_limit_s=self._config.worker_silence_limit_s,
                stall_limit_s=self._config.worker_stall_limit_s,
            )  # fmt: skip
            if reason is not None:
                # Killed, it exits like a crash: its generations fail and models/loaded.py restarts it.
                log.error("worker %s (%s): %s; killing it as hung", handle.worker_id, handle.name, reason)
                handle.hang_reason = reason
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
        handle.stop_requested = True
        running = list(handle.running.values())
        for generation in [*handle.queue, *running]:
            generation.fail(code, reason, retryable=True)
        handle.queue.clear()
        for generation in running:
            handle.cancel(generation)  # so the worker stops computing at once
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
