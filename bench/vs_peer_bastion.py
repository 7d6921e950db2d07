"""bastion as the comparison drives it: a private supervisor in a temporary home.

`PrivateBastion` writes `config.toml` with the models a scenario needs (all
pointing at the same GGUF with the same n_ctx and threads), starts a
supervisor of its own through the client library, and talks to it over one
control connection: named-session runs, several runs at once (events are
told apart by request id), loading, `ps`, cancelling. Times are taken at the
client, when events arrive. `close` shuts the supervisor down and makes sure
no worker it started outlives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import psutil
from vs_peer_reply import Reply

from bastion.client.connection import ClientError, ControlConnection
from bastion.client.launcher import ensure_supervisor, wait_until_stopped
from bastion.protocol import (
    Cancel,
    GenerationStats,
    HomeLayout,
    RequestFailed,
    Shutdown,
    TokenDelta,
)
from bastion.protocol.agent_events import ContextBudget, RunWarning
from bastion.protocol.control import (
    ListModels,
    LoadModel,
    ModelList,
    ModelLoaded,
    ModelStatus,
    Run,
    RunFinished,
    RunStarted,
    SamplingRequest,
)
from bastion.protocol.home import same_supervisor_running, supervisor_running

_RECEIVE_S = 2.0
_RUN_TIMEOUT_S = 1800.0
# Called after each token with the reply so far; may cancel or kill.
OnToken = Callable[[Reply], None]


@dataclass(frozen=True)
class ModelEntry:
    path: Path
    n_ctx: int
    threads: int


class PrivateBastion:
    def __init__(
        self,
        home: Path,
        models: dict[str, ModelEntry],
        say: Callable[[str], None],
        supervisor_args: tuple[str, ...] = (),
    ) -> None:
        home.mkdir(parents=True, exist_ok=True)
        config = [f'default = "{next(iter(models))}"']
        for name, entry in models.items():
            config += [f"[models.{name}]", f'path = "{entry.path}"', f"n_ctx = {entry.n_ctx}",
                       f"threads = {entry.threads}"]  # fmt: skip
        (home / "config.toml").write_text("\n".join(config) + "\n")
        os.environ["BASTION_HOME"] = str(home)  # the supervisor is started as our child and reads it
        self.layout = HomeLayout(home)
        if supervisor_args:
            _start_with(self.layout, supervisor_args)
        self.connection: ControlConnection = ensure_supervisor(self.layout, say)
        self.worker_pids: set[int] = set()

    def load(self, model: str, timeout_s: float = 60.0) -> ModelStatus:
        """Load `model` (a no-op when loaded); a retryable refusal (busy, restarting) is retried."""
        deadline = time.monotonic() + timeout_s
        while True:
            request = LoadModel(request_id=uuid.uuid4().hex, model=model)
            self.connection.send(request)
            for event in self.connection.events(request.request_id):
                match event:
                    case ModelLoaded():
                        self.worker_pids.add(event.model.pid)
                        return event.model
                    case RequestFailed():
                        if not event.retryable or time.monotonic() > deadline:
                            raise RuntimeError(f"loading {model} failed: {event.code.value}: {event.message}")
                        time.sleep((event.retry_after_ms or 200) / 1000)
                        break

    def models(self) -> list[ModelStatus]:
        answer = self.connection.request(ListModels(request_id=uuid.uuid4().hex))
        assert isinstance(answer, ModelList), answer
        return answer.models

    def status(self, model: str) -> ModelStatus | None:
        return next((m for m in self.models() if m.name == model), None)

    def run(self, prompt: str, *, model: str, max_tokens: int, session: str | None = None,
            on_token: OnToken | None = None) -> Reply:  # fmt: skip
        return self.run_many([self.request(prompt, model=model, max_tokens=max_tokens, session=session)],
                             on_token)[0]  # fmt: skip

    @staticmethod
    def request(prompt: str, *, model: str, max_tokens: int, session: str | None = None) -> Run:
        """A greedy run that always generates `max_tokens` (end of generation ignored)."""
        sampling = SamplingRequest(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return Run(request_id=uuid.uuid4().hex, prompt=prompt, model=model, session=session, sampling=sampling)

    def run_many(self, requests: list[Run], on_token: OnToken | None = None,
                 timeout_s: float = _RUN_TIMEOUT_S) -> list[Reply]:  # fmt: skip
        """Send every request at once and follow them all to their end."""
        replies: dict[str, Reply] = {}
        for request in requests:
            replies[request.request_id] = Reply(sent_at=time.perf_counter())
            self.connection.send(request)
        open_ids = set(replies)
        deadline = time.perf_counter() + timeout_s
        while open_ids:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"no run_end within {timeout_s:.0f} s; see {self.layout.supervisor_log}")
            event = self.connection.receive(_RECEIVE_S)
            if event is None:
                if not same_supervisor_running(self.layout, self.connection.supervisor_pid):
                    raise RuntimeError(f"the supervisor exited; see {self.layout.supervisor_log}")
                continue
            reply = replies.get(getattr(event, "request_id", ""))
            if reply is None:
                continue
            now = time.perf_counter()
            self._record(reply, event, now)
            if isinstance(event, RunFinished):
                open_ids.discard(event.request_id)
            elif isinstance(event, TokenDelta) and on_token is not None:
                on_token(reply)
        return [replies[r.request_id] for r in requests]

    def _record(self, reply: Reply, event: object, now: float) -> None:
        match event:
            case RunStarted():
                reply.details["worker_pid"] = event.worker_pid
                reply.details["run_start_ms"] = round(1000 * (now - reply.sent_at), 3)
                self.worker_pids.add(event.worker_pid)
            case TokenDelta():
                if reply.first_token_at is None:
                    reply.first_token_at = now
                reply.token_times.append(now)
                reply.text += event.text
                reply.completion_tokens = event.n
            case GenerationStats():
                stats = msgspec.to_builtins(event)
                stats.pop("type", None)
                stats.pop("request_id", None)
                reply.details["stats"] = stats
            case ContextBudget():
                reply.details["context_used"] = event.used_tokens
                reply.details["context_max"] = event.max_tokens
                reply.details["pruned_messages"] = reply.details.get("pruned_messages", 0) + event.messages_pruned
            case RunWarning():
                reply.details.setdefault("warnings", []).append(f"{event.code.value}: {event.message}")
            case RequestFailed():
                reply.error = f"{event.code.value}: {event.message}"
                reply.error_at = now
                reply.details["error_code"] = event.code.value
            case RunFinished():
                reply.end_at = now
                reply.details["stop_reason"] = event.stop_reason.value

    def cancel(self, request_id: str) -> None:
        self.connection.send(Cancel(request_id=request_id))

    def wait_worker_replaced(self, model: str, old_pid: int, timeout_s: float = 10.0) -> None:
        """After killing `old_pid`: wait until it is gone and the supervisor no longer lists it as serving."""
        deadline = time.monotonic() + timeout_s
        try:
            psutil.Process(old_pid).wait(timeout_s)
        except psutil.NoSuchProcess:
            pass
        while time.monotonic() < deadline:
            status = self.status(model)
            if status is None or status.pid != old_pid or status.state.value not in ("idle", "busy"):
                return
            time.sleep(0.02)

    def close(self) -> None:
        pid = self.connection.supervisor_pid
        try:
            self.connection.request(Shutdown(request_id="bye"), timeout_s=30)
        except ClientError as exc:
            print(f"  shutdown: {exc.message}", file=sys.stderr)
        finally:
            self.connection.close()
        wait_until_stopped(self.layout, 30, pid)
        for worker in self.worker_pids:  # they die with the supervisor; this only makes sure
            try:
                process = psutil.Process(worker)
                if "bastion" in " ".join(process.cmdline()):
                    process.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass


def _start_with(layout: HomeLayout, args: tuple[str, ...], timeout_s: float = 60.0) -> None:
    """Start a supervisor with extra flags (ensure_supervisor then connects to
    it instead of starting a plain one); wait until it holds the home's lock."""
    layout.ensure()
    log = open(layout.supervisor_log, "ab")  # noqa: SIM115 - handed to the child
    process = subprocess.Popen([sys.executable, "-m", "bastion.supervisor", *args], stdin=subprocess.DEVNULL,
                               stdout=log, stderr=log, start_new_session=True)  # fmt: skip
    log.close()
    deadline = time.monotonic() + timeout_s
    while not supervisor_running(layout):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the supervisor with {' '.join(args)} did not start; see {layout.supervisor_log}")
        time.sleep(0.05)
