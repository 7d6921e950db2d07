"""The control requests other than trust, in-process: sessions, models, and the
core's own rules (handshake, request ids, one answer per request), against the
real supervisor wired as the daemon wires it (tests/inprocess.py).

A scripted model replays its replies in order across every run that uses it,
whatever the session.
"""

from __future__ import annotations

import os

import pytest

from bastion.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    ErrorCode,
    Hello,
    HelloAccepted,
    RequestFailed,
    Role,
    StopReason,
    TokenDelta,
    WorkerState,
)
from bastion.protocol.control import (
    ControlEvent,
    GetStatus,
    ListModels,
    LoadModel,
    LoadProgress,
    LoadStage,
    ModelLoaded,
    Run,
    RunFinished,
    UnloadModel,
)
from bastion.protocol.sessions import (
    ChatRole,
    ClearSession,
    DeleteSession,
    ForkSession,
    ListSessions,
    PinMessage,
    RunStatus,
    SessionAction,
    SessionList,
    SessionState,
    SessionSummary,
    ShowSession,
)
from bastion.protocol.trust import Diagnose, ListApprovals, ListTools, ShowPolicy, VerifyAudit
from tests.inprocess import InProcessSupervisor, failure_of, of_type, request_id, run_request, script
from tests.scripted import prose


async def summaries(sup: InProcessSupervisor) -> dict[str, SessionSummary]:
    listing = await sup.ask(ListSessions(request_id=request_id("list")))
    return {summary.name: summary for summary in listing.sessions}  # type: ignore[union-attr]


async def contents(sup: InProcessSupervisor, name: str) -> list[tuple[ChatRole, str, bool]]:
    detail = await sup.ask(ShowSession(request_id=request_id("show"), name=name))
    return [(m.role, m.content, m.pinned) for m in detail.messages]  # type: ignore[union-attr]


async def streaming(sup: InProcessSupervisor, request: Run) -> None:
    """Send a run and return once its reply is streaming."""
    sup.send(request)
    await sup.wait_for(lambda: of_type(sup.of(request.request_id), TokenDelta))


async def finished(sup: InProcessSupervisor, request_id: str) -> list[ControlEvent]:
    await sup.wait_for(lambda: of_type(sup.of(request_id), RunFinished))
    return sup.of(request_id)


def hello(version: int = PROTOCOL_VERSION) -> Hello:
    return Hello(protocol_version=version, role=Role.CLIENT)



# --- sessions ------------------------------------------------------------------------


def test_a_session_is_running_while_a_run_streams_then_idle_with_its_last_run_finished(
    supervised, tmp_path
) -> None:
    model = script(tmp_path, "first answer", prose(80))

    async def test(sup: InProcessSupervisor) -> None:
        assert await summaries(sup) == {}
        await sup.run(run_request(model, "one?", session="s"))
        idle = (await summaries(sup))["s"]
        assert idle.state is SessionState.IDLE and idle.last_run is RunStatus.FINISHED
        assert (idle.messages, idle.runs, idle.model) == (2, 1, model)
        request = run_request(model, "two?", session="s")
        await streaming(sup, request)
        busy = (await summaries(sup))["s"]
        assert busy.state is SessionState.RUNNING and busy.last_run is RunStatus.RUNNING
        sup.send(Cancel(request_id=request.request_id))
        assert (await finished(sup, request.request_id))[-1].stop_reason is StopReason.CANCELLED
        after = (await summaries(sup))["s"]
        assert after.state is SessionState.IDLE and after.last_run is RunStatus.FINISHED and after.runs == 2

    supervised(test, token_delay=0.005)


def test_sessions_fork_clear_pin_and_delete_with_runs_in_between(supervised, tmp_path) -> None:
    model = script(tmp_path, "Paris.", "About 2.1 million.", "In 1889.")
    user, assistant = ChatRole.USER, ChatRole.ASSISTANT

    async def test(sup: InProcessSupervisor) -> None:
        await sup.run(run_request(model, "Capital of France?", session="trip"))
        forked = await sup.ask(ForkSession(request_id="fork", name="trip", new_name="branch"))
        assert (forked.name, forked.action) == ("branch", SessionAction.FORKED)  # type: ignore[union-attr]
        # The fork continues from a copy; the original does not see the fork's turns.
        await sup.run(run_request(model, "Its population?", session="branch"))
        assert await contents(sup, "trip") == [(user, "Capital of France?", False), (assistant, "Paris.", False)]
        assert await contents(sup, "branch") == [
            (user, "Capital of France?", False), (assistant, "Paris.", False),
            (user, "Its population?", False), (assistant, "About 2.1 million.", False),
        ]  # fmt: skip
        # Pinning without text pins your latest message; with text adds a pinned note.
        pinned = await sup.ask(PinMessage(request_id="pin", name="branch"))
        assert pinned.action is SessionAction.PINNED  # type: ignore[union-attr]
        assert (await contents(sup, "branch"))[2] == (user, "Its population?", True)
        await sup.ask(PinMessage(request_id="note", name="trip", text="We travel in May."))
        cleared = await sup.ask(ClearSession(request_id="clear", name="trip"))
        assert cleared.action is SessionAction.CLEARED  # type: ignore[union-attr]
        assert await contents(sup, "trip") == [(user, "We travel in May.", True)]  # pins survive a clear
        await sup.run(run_request(model, "When was the tower built?", session="trip"))
        assert (await contents(sup, "trip"))[1:] == [(user, "When was the tower built?", False),
                                                     (assistant, "In 1889.", False)]
        deleted = await sup.ask(DeleteSession(request_id="delete", name="branch"))
        assert deleted.action is SessionAction.DELETED  # type: ignore[union-attr]
        assert set(await summaries(sup)) == {"trip"}
        refork = await sup.ask(ForkSession(request_id="refork", name="trip", new_name="trip"))
        assert refork.code is ErrorCode.INVALID_REQUEST and "already exists" in refork.message  # type: ignore

    supervised(test)


def test_deleting_a_session_a_run_is_serving_is_refused_as_busy(supervised, tmp_path) -> None:
    model = script(tmp_path, prose(20))

    async def test(sup: InProcessSupervisor) -> None:
        request = run_request(model, session="busy")
        await streaming(sup, request)
        refused = await sup.ask(DeleteSession(request_id="delete", name="busy"))
        events = await finished(sup, request.request_id)
        assert failure_of(events) is None and events[-1].stop_reason is StopReason.STOP
        assert isinstance(refused, RequestFailed) and refused.code is ErrorCode.BUSY and refused.retryable
        assert "busy" in await summaries(sup)

    supervised(test, token_delay=0.002)


@pytest.mark.parametrize("request_type", [ShowSession, DeleteSession, ClearSession, PinMessage, ForkSession])
def test_an_unknown_session_is_an_invalid_request_naming_it(supervised, request_type) -> None:
    async def test(sup: InProcessSupervisor) -> None:
        fields = {"new_name": "copy"} if request_type is ForkSession else {}
        failed = await sup.ask(request_type(request_id="ghostly", name="ghost", **fields))
        assert isinstance(failed, RequestFailed) and failed.code is ErrorCode.INVALID_REQUEST
        assert "'ghost'" in failed.message
        assert await summaries(sup) == {}  # nothing was created on the way

    supervised(test)


# --- models --------------------------------------------------------------------------


def test_a_load_reports_progress_then_the_model_and_a_second_load_says_already_loaded(
    supervised, tmp_path
) -> None:
    model = script(tmp_path, "hello", name="greeter")

    async def test(sup: InProcessSupervisor) -> None:
        loaded = await sup.ask(LoadModel(request_id="load", model=model))
        assert isinstance(loaded, ModelLoaded) and not loaded.already_loaded
        assert loaded.model.name == "scripted-greeter" and loaded.model.state is WorkerState.IDLE
        events = sup.of("load")
        assert events[-1] is loaded and {type(e) for e in events[:-1]} == {LoadProgress}
        assert [e.stage for e in events[:-1]][-1] is LoadStage.READY
        assert LoadStage.SPAWNING in [e.stage for e in events[:-1]]
        again = await sup.ask(LoadModel(request_id="again", model=model))
        assert again.already_loaded and len(sup.workers.started) == 1  # type: ignore[union-attr]
        [status] = (await sup.ask(ListModels(request_id="models"))).models  # type: ignore[union-attr]
        assert status.name == "scripted-greeter"
        unloaded = await sup.ask(UnloadModel(request_id="unload", model="scripted-greeter"))
        assert unloaded.name == "scripted-greeter"  # type: ignore[union-attr]
        assert (await sup.ask(ListModels(request_id="none"))).models == []  # type: ignore[union-attr]

    supervised(test)


def test_unloading_a_model_that_is_not_loaded_is_unknown_model(supervised, tmp_path) -> None:
    async def test(sup: InProcessSupervisor) -> None:
        failed = await sup.ask(UnloadModel(request_id="unload", model="nowhere"))
        assert isinstance(failed, RequestFailed) and failed.code is ErrorCode.UNKNOWN_MODEL
        assert "nowhere" in failed.message

    supervised(test)


def test_status_counts_the_active_runs_and_loaded_models(supervised, tmp_path) -> None:
    model = script(tmp_path, prose(200))

    async def test(sup: InProcessSupervisor) -> None:
        idle = await sup.ask(GetStatus(request_id="before"))
        assert (idle.runs_active, idle.models_loaded) == (0, 0)  # type: ignore[union-attr]
        request = run_request(model)
        await streaming(sup, request)
        busy = await sup.ask(GetStatus(request_id="during"))
        assert (busy.runs_active, busy.models_loaded) == (1, 1)  # type: ignore[union-attr]
        assert busy.protocol_version == PROTOCOL_VERSION  # type: ignore[union-attr]
        sup.send(Cancel(request_id=request.request_id))
        await finished(sup, request.request_id)
        after = await sup.ask(GetStatus(request_id="after"))
        assert (after.runs_active, after.models_loaded) == (0, 1)  # type: ignore[union-attr]

    supervised(test, token_delay=0.005)


# --- the core: handshake, request ids, one answer each -------------------------------------


def test_a_request_before_hello_is_refused_with_hello_required(supervised) -> None:
    async def test(sup: InProcessSupervisor) -> None:
        stranger = b"stranger"
        sup.send(ListSessions(request_id="early"), stranger)
        failed = await sup.wait_for(lambda: sup.of("early"))
        assert [(c, type(e)) for c, e in sup.events if getattr(e, "request_id", "") == "early"] == [
            (stranger, RequestFailed)]
        assert failed[0].code is ErrorCode.HELLO_REQUIRED  # type: ignore[index]
        sup.send(hello(), stranger)
        sup.send(ListSessions(request_id="after-hello"), stranger)
        [answer] = await sup.wait_for(lambda: sup.of("after-hello"))  # type: ignore[misc]
        assert isinstance(answer, SessionList)

    supervised(test)


def test_a_hello_with_another_protocol_version_is_a_protocol_mismatch(supervised) -> None:
    async def test(sup: InProcessSupervisor) -> None:
        old = b"old-client"
        sup.send(hello(PROTOCOL_VERSION + 1), old)
        [(_, refused)] = await sup.wait_for(lambda: [(c, e) for c, e in sup.events if c == old])  # type: ignore
        assert isinstance(refused, RequestFailed) and refused.code is ErrorCode.PROTOCOL_MISMATCH
        assert str(PROTOCOL_VERSION) in refused.message
        # Refused means not connected: its requests still need a hello.
        sup.send(GetStatus(request_id="status"), old)
        [failed] = await sup.wait_for(lambda: sup.of("status"))  # type: ignore[misc]
        assert failed.code is ErrorCode.HELLO_REQUIRED
        assert not any(c == old and isinstance(e, HelloAccepted) for c, e in sup.events)

    supervised(test)


def test_a_second_run_with_a_running_request_id_is_a_duplicate_request(supervised, tmp_path) -> None:
    model = script(tmp_path, prose(20), "other")

    async def test(sup: InProcessSupervisor) -> None:
        request = run_request(model)
        await streaming(sup, request)
        sup.send(Run(request_id=request.request_id, prompt="again", model=model))
        await sup.wait_for(lambda: failure_of(sup.of(request.request_id)))
        assert failure_of(sup.of(request.request_id)).code is ErrorCode.DUPLICATE_REQUEST  # type: ignore
        # The first run is untouched: it ends once, normally, with its own reply.
        events = await finished(sup, request.request_id)
        assert [e.stop_reason for e in of_type(events, RunFinished)] == [StopReason.STOP]
        assert "".join(e.text for e in of_type(events, TokenDelta)) == prose(20)

    supervised(test, token_delay=0.002)


def test_cancelling_an_unknown_request_is_unknown_request(supervised) -> None:
    async def test(sup: InProcessSupervisor) -> None:
        failed = await sup.ask(Cancel(request_id="never-sent"))
        assert isinstance(failed, RequestFailed) and failed.code is ErrorCode.UNKNOWN_REQUEST
        assert "never-sent" in failed.message

    supervised(test)


def test_every_non_run_request_gets_exactly_one_answer(supervised, tmp_path) -> None:
    model = script(tmp_path, "hi")
    requests = [
        GetStatus(request_id="q-status"), ListModels(request_id="q-models"),
        LoadModel(request_id="q-load", model=model), UnloadModel(request_id="q-unload", model="nowhere"),
        ListSessions(request_id="q-sessions"), ShowSession(request_id="q-show", name="ghost"),
        ListTools(request_id="q-tools"), ShowPolicy(request_id="q-policy"),
        ListApprovals(request_id="q-approvals"), VerifyAudit(request_id="q-audit"), Diagnose(request_id="q-doctor"),
        Cancel(request_id="q-cancel"),
    ]  # fmt: skip

    async def test(sup: InProcessSupervisor) -> None:
        for request in requests:
            sup.send(request)

        def answers(request_id: str) -> list[ControlEvent]:
            return [e for e in sup.of(request_id) if not isinstance(e, LoadProgress)]

        await sup.wait_for(lambda: all(answers(r.request_id) for r in requests))
        # A last request through the same path, answered after all of them: anything more would be here by now.
        await sup.ask(ListSessions(request_id="q-barrier"))
        counts = {r.request_id: len(answers(r.request_id)) for r in requests}
        assert counts == {r.request_id: 1 for r in requests}
        failed = {r.request_id for r in requests if isinstance(answers(r.request_id)[0], RequestFailed)}
        assert failed == {"q-unload", "q-show", "q-cancel"}

    supervised(test)


# --- clients that die --------------------------------------------------------------------


def test_a_process_s_connections_share_one_watch_of_it(supervised) -> None:
    """Every connection names its process in its hello; the supervisor holds one pidfd per
    process however many connections it opens (a long-lived script must not exhaust its fds).
    The process exiting is tested end to end (test_cli_e2e.py, test_gateway_e2e.py)."""

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def test(sup: InProcessSupervisor) -> None:
        before = open_fds()
        for k in range(20):
            sup.send(Hello(protocol_version=PROTOCOL_VERSION, role=Role.CLIENT, pid=os.getpid()), f"conn-{k}".encode())
        await sup.wait_for(lambda: any(client == b"conn-19" and isinstance(event, HelloAccepted)
                                       for client, event in sup.events))  # fmt: skip
        assert open_fds() - before == 1

    supervised(test)
