"""Wire protocol: every message round-trips; bad frames are typed errors."""

from __future__ import annotations

import typing

import msgspec
import pytest

from bastion.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    ErrorCode,
    GenerationStats,
    Heartbeat,
    Hello,
    HelloAccepted,
    ProtocolError,
    RequestFailed,
    Role,
    SamplingParams,
    Shutdown,
    StopReason,
    TokenDelta,
    WorkerState,
    client_codec,
    supervisor_control_codec,
    supervisor_worker_codec,
    worker_codec,
)
from bastion.protocol.agent_events import (
    CallFormat,
    ContextBudget,
    ContextStrategy,
    PromptRendered,
    RunWarning,
    ToolCallParsed,
    ToolDecision,
    ToolDecisionKind,
    ToolEnded,
    ToolOutput,
    ToolStarted,
    TurnFinished,
    TurnStarted,
    WarningCode,
)
from bastion.protocol.codec import all_tags, sandbox_codec, supervisor_sandbox_codec
from bastion.protocol.control import (
    ControlEvent,
    ControlRequest,
    GetStatus,
    ListModels,
    LoadModel,
    LoadProgress,
    LoadStage,
    ModelList,
    ModelLoaded,
    ModelStatus,
    ModelUnloaded,
    Run,
    RunFinished,
    RunStarted,
    ShutdownStarted,
    StatusReport,
    UnloadModel,
)
from bastion.protocol.sandbox_wire import (
    ConfinementLevel,
    ConfinementReport,
    FromSandbox,
    LayerStatus,
    ReadFileArgs,
    RunTool,
    SandboxReady,
    ShellArgs,
    ToolChunk,
    ToolEnvelope,
    ToolFinished,
    ToolStream,
    ToSandbox,
    TruncationReason,
    WriteFileArgs,
)
from bastion.protocol.sessions import (
    ChatRole,
    ClearSession,
    DeleteSession,
    ForkSession,
    ListSessions,
    PinMessage,
    SessionAction,
    SessionChanged,
    SessionDetail,
    SessionList,
    SessionMessage,
    SessionSummary,
    ShowSession,
)
from bastion.protocol.tool_catalog import TrustFlag
from bastion.protocol.trust import (
    ApprovalInfo,
    ApprovalList,
    ApprovalRequired,
    ApprovalResolved,
    AuditVerified,
    CheckPolicy,
    Diagnose,
    Diagnosis,
    InvokeTool,
    ListApprovals,
    ListTools,
    PolicyCaseResult,
    PolicyChecked,
    PolicyShown,
    ResolveApproval,
    ShowPolicy,
    ToolInfo,
    ToolInvoked,
    ToolList,
    VerifyAudit,
)
from bastion.protocol.worker_wire import (
    FromWorker,
    Generate,
    GenerationFinished,
    ModelDescription,
    SetThreads,
    ToWorker,
    WorkerLoadFailed,
    WorkerReady,
)

STATUS = ModelStatus(name="m", path="/m.gguf", state=WorkerState.IDLE, pid=42, n_ctx=4096, kv_tokens=7)
DESCRIPTION = ModelDescription(
    name="m", path="/m.gguf", architecture="llama", n_ctx=4096, n_ctx_train=8192, n_vocab=49152,
    n_params=134_515_008, threads=2, has_chat_template=True, chat_template="{{ x }}", bos_token="<s>",
    eos_token="</s>", file_size=1, load_ms=2.5, rss_bytes=3,
)  # fmt: skip
STATS = GenerationStats(
    request_id="r", prompt_tokens=10, cached_tokens=4, completion_tokens=3, ttft_ms=1.0, prefill_ms=0.5,
    decode_ms=2.0, prefill_tokens_per_s=12.0, decode_tokens_per_s=1500.0, kv_tokens=13,
)  # fmt: skip

REPORT = ConfinementReport(level=ConfinementLevel.PARTIAL, layers=[
    LayerStatus(name="landlock", active=False, detail="kernel lacks it", fix="a newer kernel")])
ENVELOPE = ToolEnvelope(ok=True, content="x", truncated=True, truncated_reason=TruncationReason.OUTPUT_CAP,
                        exit_code=0, duration_ms=1.5)
_ = ReadFileArgs  # every tool's arguments travel inside RunTool/InvokeTool

SAMPLES: list[msgspec.Struct] = [
    Hello(protocol_version=PROTOCOL_VERSION, role=Role.CLIENT, name="cli", pid=1),
    HelloAccepted(protocol_version=PROTOCOL_VERSION, supervisor_pid=2),
    Heartbeat(seq=3, progress=4, kv_tokens=5, busy=True),
    RequestFailed(request_id="r", code=ErrorCode.BUSY, message="full", retryable=True, retry_after_ms=100),
    Cancel(request_id="r"),
    Shutdown(request_id="r"),
    SetThreads(threads=1),
    TokenDelta(request_id="r", text="hé", n=2, tokens_per_s=50.5),
    STATS,
    Generate(request_id="r", session_id="s", prompt="p", sampling=SamplingParams(seed=3, stop=("\n",))),
    WorkerReady(model=DESCRIPTION),
    WorkerLoadFailed(code=ErrorCode.INVALID_MODEL_FILE, message="not a gguf"),
    GenerationFinished(request_id="r", stop_reason=StopReason.LENGTH, completion_tokens=3, kv_tokens=9),
    Run(request_id="r", prompt="hi", model="smollm2-135m", system="be brief", sampling=SamplingParams(max_tokens=5),
        session="s", tools=("calculator",), template="chatml", max_iterations=3, show_prompt=True),
    GetStatus(request_id="r"),
    ListModels(request_id="r"),
    LoadModel(request_id="r", model="gemma3-270m"),
    UnloadModel(request_id="r", model="gemma3-270m"),
    LoadProgress(request_id="r", model="m", stage=LoadStage.ASSEMBLING, done=5, total=10),
    RunStarted(request_id="r", model="m", worker_pid=3, template="gguf"),
    RunFinished(request_id="r", stop_reason=StopReason.CANCELLED),
    ModelList(request_id="r", models=[STATUS]),
    ModelLoaded(request_id="r", model=STATUS, already_loaded=True),
    ModelUnloaded(request_id="r", name="m"),
    StatusReport(request_id="r", pid=1, version="0.1", protocol_version=1, home="/h", control_endpoint="ipc://x",
                 uptime_s=1.0, models_loaded=0, runs_active=0),
    ShutdownStarted(request_id="r"),
    TurnStarted(request_id="r", session="s", iteration=1),
    ContextBudget(request_id="r", used_tokens=10, max_tokens=20, context_size=30, messages_kept=3,
                  messages_pruned=1, strategy=ContextStrategy.WINDOW),
    ToolCallParsed(request_id="r", call_id="c1", name="calculator", arguments='{"expression":"1+1"}',
                   format=CallFormat.FENCED),
    ToolDecision(request_id="r", call_id="c1", decision=ToolDecisionKind.ALLOW, reason="built-in"),
    ToolStarted(request_id="r", call_id="c1", name="calculator"),
    ToolOutput(request_id="r", call_id="c1", text="2"),
    ToolEnded(request_id="r", call_id="c1", name="calculator", ok=True, content="2", duration_ms=0.1),
    RunWarning(request_id="r", code=WarningCode.MAX_ITERATIONS, message="stopped"),
    TurnFinished(request_id="r", iteration=1, stop_reason=StopReason.MAX_ITERATIONS, tool_calls=2),
    PromptRendered(request_id="r", model="m", template="gguf", prompt="<|im_start|>", tokens=3),
    ListSessions(request_id="r"),
    ShowSession(request_id="r", name="s", with_prompt=True),
    DeleteSession(request_id="r", name="s"),
    ForkSession(request_id="r", name="s", new_name="t"),
    ClearSession(request_id="r", name="s"),
    PinMessage(request_id="r", name="s", text="remember"),
    SessionList(request_id="r", sessions=[SessionSummary(name="s", model="m", created_at=1.0, updated_at=2.0,
                                                         messages=3, runs=1)]),
    SessionDetail(request_id="r", session=SessionSummary(name="s", model="m", created_at=1.0, updated_at=2.0,
                                                         messages=1, runs=1),
                  messages=[SessionMessage(seq=1, role=ChatRole.USER, content="hi", pinned=True)], prompt="p"),
    SessionChanged(request_id="r", name="s", action=SessionAction.FORKED),
    SandboxReady(report=REPORT),
    RunTool(request_id="r", arguments=ShellArgs(command="ls -la"), workspace="/ws",
            required_level=ConfinementLevel.STRONG),
    ToolChunk(request_id="r", stream=ToolStream.STDERR, text="warn"),
    ToolFinished(request_id="r", envelope=ENVELOPE),
    ApprovalRequired(request_id="r", approval_id="a1", call_id="c1", tool="write_file", arguments="{}",
                     reason="writes ask", expires_at=10.0),
    ListApprovals(request_id="r"),
    ApprovalList(request_id="r", approvals=[ApprovalInfo(approval_id="a1", session="s", tool="shell", arguments="{}",
                                                         workspace="/ws", reason="ask", created_at=1.0,
                                                         expires_at=2.0)]),
    ResolveApproval(request_id="r", approval_id="a1", approve=True, ttl_s=3600.0, uses=2),
    ApprovalResolved(request_id="r", approval_id="a1", approved=True),
    ListTools(request_id="r"),
    ToolList(request_id="r", tools=[ToolInfo(name="shell", description="d", parameters={"type": "object"},
                                             sandboxed=True, writes=True, needs_flag=TrustFlag.ALLOW_SHELL)]),
    InvokeTool(request_id="r", arguments=WriteFileArgs(path="a.txt", content="x"), workspace="/ws",
               allow_write=True),
    ToolInvoked(request_id="r", decision=ToolDecisionKind.ALLOW, reason="rule", envelope=ENVELOPE),
    ShowPolicy(request_id="r"),
    PolicyShown(request_id="r", source="/p.toml", hash="abc", text="rules"),
    CheckPolicy(request_id="r", cases_path="/c.toml", workspace="/ws"),
    PolicyChecked(request_id="r", results=[PolicyCaseResult(name="n", expected=ToolDecisionKind.DENY, actual=ToolDecisionKind.DENY,
                                                            passed=True)]),
    VerifyAudit(request_id="r"),
    AuditVerified(request_id="r", ok=False, records=3, problems=["line 2: edited"], path="/a.jsonl"),
    Diagnose(request_id="r"),
    Diagnosis(request_id="r", confinement=REPORT, notes=["ok"]),
]

DIRECTIONS = [
    ("to_worker", ToWorker, supervisor_worker_codec, worker_codec),
    ("from_worker", FromWorker, worker_codec, supervisor_worker_codec),
    ("control_request", ControlRequest, client_codec, supervisor_control_codec),
    ("control_event", ControlEvent, supervisor_control_codec, client_codec),
    ("to_sandbox", ToSandbox, supervisor_sandbox_codec, sandbox_codec),
    ("from_sandbox", FromSandbox, sandbox_codec, supervisor_sandbox_codec),
]


def members(union: object) -> set[type]:
    return set(typing.get_args(union))


def test_samples_cover_every_message_of_every_direction() -> None:
    covered = {type(sample) for sample in SAMPLES}
    for _, union, _, _ in DIRECTIONS:
        assert members(union) <= covered


def test_every_tag_names_exactly_one_struct() -> None:
    structs = set().union(*(members(union) for _, union, _, _ in DIRECTIONS))
    tags = [msgspec.inspect.type_info(cls).tag for cls in structs]
    assert len(tags) == len(set(tags)) == len(all_tags())


@pytest.mark.parametrize(("name", "union", "sender", "receiver"), DIRECTIONS, ids=[d[0] for d in DIRECTIONS])
def test_every_message_round_trips(name, union, sender, receiver) -> None:
    send, receive = sender(), receiver()
    for sample in SAMPLES:
        if type(sample) in members(union):
            assert receive.decode(send.encode(sample)) == sample


@pytest.mark.parametrize(("name", "union", "sender", "receiver"), DIRECTIONS, ids=[d[0] for d in DIRECTIONS])
def test_message_of_another_direction_is_rejected_on_both_edges(name, union, sender, receiver) -> None:
    send, receive = sender(), receiver()
    raw = msgspec.msgpack.Encoder()
    foreign = [s for s in SAMPLES if type(s) not in members(union)]
    assert foreign
    for sample in foreign:
        with pytest.raises(ProtocolError) as sent:
            send.encode(sample)
        assert sent.value.code is ErrorCode.WRONG_DIRECTION
        with pytest.raises(ProtocolError) as received:
            receive.decode(raw.encode(sample))
        assert received.value.code is ErrorCode.WRONG_DIRECTION, sample


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\xc1garbage", ErrorCode.MALFORMED_MESSAGE),
        (b"", ErrorCode.MALFORMED_MESSAGE),
        (msgspec.msgpack.encode(Run(request_id="r", prompt="hello"))[:-3], ErrorCode.MALFORMED_MESSAGE),
        (msgspec.msgpack.encode({"type": "teleport", "request_id": "r"}), ErrorCode.UNKNOWN_MESSAGE),
        (msgspec.msgpack.encode({"type": "run", "request_id": 5, "prompt": "x"}), ErrorCode.MALFORMED_MESSAGE),
        (msgspec.msgpack.encode([1, 2, 3]), ErrorCode.MALFORMED_MESSAGE),
        (msgspec.msgpack.encode({"no_type": 1}), ErrorCode.MALFORMED_MESSAGE),
    ],
    ids=["garbage", "empty", "truncated", "unknown_tag", "wrong_field_type", "not_a_map", "untagged"],
)
def test_bad_frames_are_typed_errors(frame: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as caught:
        supervisor_control_codec().decode(frame)
    assert caught.value.code is code


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    frame = msgspec.msgpack.encode({"type": "cancel", "request_id": "r", "added_in_v2": True})
    assert supervisor_control_codec().decode(frame) == Cancel(request_id="r")


def test_json_events_carry_their_type() -> None:
    line = msgspec.json.encode(TokenDelta(request_id="r", text="a", n=1, tokens_per_s=2.0))
    assert msgspec.json.decode(line) == {"type": "token", "request_id": "r", "text": "a", "n": 1, "tokens_per_s": 2.0}
