"""A stand-in for `WorkerPool` for in-process tests of `LoadedModels`: real
`WorkerHandle`s, no processes. Each worker says hello and becomes ready (or
fails its load) as soon as it is spawned; a test crashes one with `crash`."""

from __future__ import annotations

import signal

from bastion.protocol import PROTOCOL_VERSION, ErrorCode, Hello, Role, WorkerState
from bastion.protocol.worker_wire import ModelDescription, WorkerLoadFailed, WorkerReady
from bastion.supervisor.config import SupervisorConfig
from bastion.supervisor.processes.worker_handle import WorkerHandle, WorkerLaunch

DESCRIPTION = ModelDescription(
    name="m", path="", architecture="scripted", n_ctx=256, n_ctx_train=256, n_vocab=258, n_params=0, threads=1,
    has_chat_template=False, chat_template="", bos_token="<s>", eos_token="</s>", file_size=0, load_ms=1.0,
    rss_bytes=0,
)  # fmt: skip


class StandInPool:
    def __init__(self, config: SupervisorConfig) -> None:
        self._config = config
        self.started: list[WorkerHandle] = []
        self.loads_fail = False

    async def spawn(self, **launch: object) -> WorkerHandle:
        fields = {k: v for k, v in launch.items() if k in WorkerLaunch.__struct_fields__}
        return self._start(WorkerLaunch(**fields))  # type: ignore[arg-type]

    async def respawn(self, dead: WorkerHandle) -> WorkerHandle:
        return self._start(dead.launch)

    def _start(self, launch: WorkerLaunch) -> WorkerHandle:
        handle = WorkerHandle(worker_id=f"w{len(self.started)}", launch=launch, send=lambda *_: None,
                              config=self._config)
        self.started.append(handle)
        handle.on_message(Hello(protocol_version=PROTOCOL_VERSION, role=Role.WORKER))
        if self.loads_fail:
            handle.on_message(WorkerLoadFailed(code=ErrorCode.INVALID_MODEL_FILE, message="the script is gone"))
        else:
            handle.on_message(WorkerReady(model=DESCRIPTION))
        return handle

    @staticmethod
    def crash(handle: WorkerHandle) -> None:
        handle.stderr_tail.append("Segmentation fault")
        handle.on_exit(-signal.SIGSEGV)

    async def stop(self, handle: WorkerHandle, code: ErrorCode = ErrorCode.SHUTTING_DOWN, reason: str = "") -> None:
        if handle.exited.done():
            return
        handle.stop_requested = True
        handle.state = WorkerState.STOPPING
        handle.on_exit(0)

    async def stop_unstarted(self, handle: WorkerHandle) -> None:
        await self.stop(handle)

    async def stop_all(self) -> None:
        for handle in list(self.started):
            await self.stop(handle)

    def alive(self) -> list[WorkerHandle]:
        return [handle for handle in self.started if not handle.exited.done()]

    def alive_names(self) -> set[str]:
        return {handle.name for handle in self.alive()}
