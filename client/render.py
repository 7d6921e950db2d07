"""How the CLI shows events: JSON lines for scripts, text for people.

`--json` prints every event as one JSON object per line, exactly the wire
struct with its `type` tag, so the stream grows with the protocol and nobody
parses prose. Text mode streams the answer to stdout and everything else
(progress, stats, errors) to stderr, so `bastion run ... > answer.txt` keeps
only the answer.
"""

from __future__ import annotations

import sys
from typing import TextIO

import msgspec

from bastion.client.memory_text import keep_alive_cell, memory_cell
from bastion.protocol import GenerationStats, RequestFailed, TokenDelta, WorkerState
from bastion.protocol.agent_events import (
    ContextBudget,
    PromptRendered,
    ReasoningDelta,
    RunWarning,
    ToolCallParsed,
    ToolDecision,
    ToolDecisionKind,
    ToolEnded,
    TurnStarted,
)
from bastion.protocol.control import ControlEvent, LoadProgress, LoadStage, ModelStatus
from bastion.protocol.remote import BackendGauge
from bastion.protocol.trust import ApprovalRequired

_RESULT_PREVIEW = 200

_json = msgspec.json.Encoder()


def json_line(event: msgspec.Struct, out: TextIO | None = None) -> None:
    stream = out or sys.stdout
    stream.write(_json.encode(event).decode() + "\n")
    stream.flush()


def json_object(value: object, out: TextIO | None = None) -> None:
    stream = out or sys.stdout
    stream.write(_json.encode(value).decode() + "\n")
    stream.flush()


def say(message: str) -> None:
    print(f"bastion: {message}", file=sys.stderr, flush=True)


def error(message: str, hint: str = "") -> None:
    print(f"bastion: error: {message}", file=sys.stderr, flush=True)
    if hint:
        print(f"  {hint}", file=sys.stderr, flush=True)


_DIM, _PLAIN = "\x1b[2m", "\x1b[0m"


class TextRenderer:
    """Renders one run's events for a person."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, *, verbose: bool = False,
                 hide_reasoning: bool = False) -> None:
        self._verbose = verbose
        self._hide_reasoning = hide_reasoning
        self._out = out or sys.stdout
        self._err = err or sys.stderr
        self._ends_with_newline = True
        self._progress_open = False
        self._reasoning_open = False  # reasoning is being written to stderr, its line not ended

    def __call__(self, event: ControlEvent) -> None:
        match event:
            case LoadProgress():
                self._progress(event)
            case ReasoningDelta(text=text) if not self._hide_reasoning:
                self._reasoning(text)
            case TokenDelta(text=text):
                self._close_progress()
                self._close_reasoning()
                if text:
                    self._out.write(text)
                    self._out.flush()
                    self._ends_with_newline = text.endswith("\n")
            case GenerationStats():
                self._finish_line()
                cached = (
                    f", {event.cached_tokens} cached ({event.cache_source.value})" if event.cached_tokens else ""
                )
                shifted = f", {event.shifted_tokens} pruned in place" if event.shifted_tokens else ""
                self._err.write(
                    f"[{event.completion_tokens} tokens, {event.decode_tokens_per_s:.1f} tok/s, "
                    f"first token {event.ttft_ms:.0f} ms, prompt {event.prompt_tokens} tokens{cached}{shifted}]\n"
                )
                if event.cache_note:
                    self._err.write(f"warning: {event.cache_note}\n")
                self._err.flush()
            case RequestFailed():
                self._finish_line()
                self._close_progress()
                error(event.message)
            case TurnStarted(iteration=iteration) if iteration > 1:
                self._finish_line()
            case ContextBudget() if self._verbose:
                self._note(f"[context {event.used_tokens}/{event.max_tokens} tokens of {event.context_size}, "
                           f"{event.messages_kept} messages, {event.messages_pruned} pruned, {event.strategy.value}]")
            case ToolCallParsed():
                self._note(f"→ {event.name} {event.arguments}")
            case ToolDecision(decision=decision) if decision is not ToolDecisionKind.ALLOW:
                self._note(f"  {decision.value}: {event.reason}")
            case ToolEnded():
                preview = event.content if len(event.content) <= _RESULT_PREVIEW else event.content[:_RESULT_PREVIEW] + "…"
                self._note(f"← {preview}" if event.ok else f"← failed: {preview}")
            case RunWarning():
                self._note(f"bastion: warning: {event.message}")
            case ApprovalRequired():
                self._note(f"? {event.tool} {event.arguments} needs approval ({event.reason}); "
                           f"answer with `bastion approve {event.approval_id}` or `bastion deny {event.approval_id}`")
            case PromptRendered():
                self._out.write(event.prompt)
                self._out.flush()
                self._ends_with_newline = True  # the prompt is printed exactly, nothing added
                self._note(f"[{event.tokens} tokens, {event.model}, template {event.template}]")
                for departure in event.departures:
                    self._note(f"[differs from the official template: {departure}]")
            case _:
                pass

    def _reasoning(self, text: str) -> None:
        """Reasoning goes to stderr (stdout keeps only the answer), dimmed on a terminal."""
        self._close_progress()
        if not text:
            return
        if not self._reasoning_open:
            self._finish_line()
            self._reasoning_open = True
        self._err.write(f"{_DIM}{text}{_PLAIN}" if self._err.isatty() else text)
        self._err.flush()

    def _close_reasoning(self) -> None:
        if self._reasoning_open:
            self._err.write("\n")
            self._err.flush()
            self._reasoning_open = False

    def _note(self, text: str) -> None:
        self._close_reasoning()
        self._finish_line()
        self._close_progress()
        self._err.write(text + "\n")
        self._err.flush()

    def finish(self) -> None:
        self._close_reasoning()
        self._finish_line()
        self._close_progress()

    def _finish_line(self) -> None:
        if not self._ends_with_newline:
            self._out.write("\n")
            self._out.flush()
            self._ends_with_newline = True

    def _progress(self, event: LoadProgress) -> None:
        percent = 0
        if event.stage is LoadStage.READY:
            self._close_progress()
            return
        if event.stage is LoadStage.ASSEMBLING and event.total:
            percent = 100 * event.done // event.total
            bar = "#" * (percent // 4)
            text = f"assembling {event.model} [{bar:<25}] {percent:3d}% of {event.total / 2**20:.0f} MiB"
        else:
            text = f"{event.stage.value} {event.model}…"
        if self._err.isatty():
            self._err.write(f"\r\x1b[2Kbastion: {text}")
            self._progress_open = True
        elif event.stage is LoadStage.LOADING or (
            event.stage is LoadStage.ASSEMBLING and (event.done in (0, event.total) or percent % 25 == 0)
        ):
            # A log file wants milestones, not every step.
            self._err.write(f"bastion: {text}\n")
        self._err.flush()

    def _close_progress(self) -> None:
        if self._progress_open:
            self._err.write("\r\x1b[2K")
            self._err.flush()
            self._progress_open = False


def model_table(models: list[ModelStatus]) -> str:
    if not models:
        return "no models loaded"
    header = ("NAME", "PID", "STATE", "RSS", "EST MEM", "CTX", "KV TOKENS", "KV SNAPSHOTS", "THREADS", "KEEP ALIVE",
              "TEMPLATE")
    rows = [header] + [
        (
            model.name,
            str(model.pid) if model.pid else "-",
            _state(model),
            f"{model.rss_bytes / 2**20:.0f} MiB",
            memory_cell(model),
            _context(model),
            str(model.kv_tokens),
            _snapshots(model),
            str(model.threads),
            keep_alive_cell(model),
            model.chat_template,
        )
        for model in models
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    for model in models:
        if model.state is WorkerState.FAILED:
            lines.append(f"{model.name} failed: {model.failure}")
            lines.append(f"  run `bastion load {model.name}` to try again")
        elif model.state is WorkerState.RESTARTING and model.failure:
            lines.append(f"{model.name} is restarting: {model.failure}")
    for model in models:
        if model.backends:
            lines.append(f"{model.name} is served by:")
            lines += [f"  {backend_line(backend)}" for backend in model.backends]
    return "\n".join(lines)


def backend_line(backend: BackendGauge) -> str:
    """`http://a:8080  healthy  1 in flight  3 sessions  cache hit 87% (1,234 of 1,420 prompt tokens)`."""
    parts = [backend.url, "healthy" if backend.healthy else "DOWN", f"{backend.in_flight} in flight",
             f"{backend.sessions} session{'s' if backend.sessions != 1 else ''}"]  # fmt: skip
    if backend.prompt_tokens:
        share = backend.cached_tokens / backend.prompt_tokens
        parts.append(f"cache hit {share:.0%} ({backend.cached_tokens:,} of {backend.prompt_tokens:,} prompt tokens)")
    if backend.contradicted:
        parts.append(f"{backend.contradicted} cache claim(s) contradict what bastion sent it")
    if not backend.healthy and backend.last_error:
        parts.append(f"last error: {backend.last_error}")
    return "  ".join(parts)


def _context(model: ModelStatus) -> str:
    """`4096`; `4096 (kv q8_0)` when the KV cache is stored other than in f16; `4 × 4096` when the
    worker decodes 4 sequences together, each with its own 4096 positions."""
    context = str(model.n_ctx) if model.parallel <= 1 else f"{model.parallel} × {model.n_ctx}"
    return context if model.kv_cache_type == "f16" else f"{context} (kv {model.kv_cache_type})"


def _state(model: ModelStatus) -> str:
    """`busy`; `busy 3/4` for a worker decoding 3 of its 4 parallel sequences; the restarts after it."""
    state = model.state.value
    if model.parallel > 1 and model.state is WorkerState.BUSY:
        state = f"{state} {model.running}/{model.parallel}"
    if model.restarts and model.state is not WorkerState.FAILED:
        return f"{state} ({model.restarts} restart{'s' if model.restarts > 1 else ''})"
    return state


def _snapshots(model: ModelStatus) -> str:
    """`2, 3.0 MiB + 1 on disk, 1.0 MiB`: per-session KV snapshots in RAM, then on disk."""
    tiers = [(count, size, where) for count, size, where in (
        (model.snapshots_ram, model.snapshot_ram_bytes, ""),
        (model.snapshots_disk, model.snapshot_disk_bytes, " on disk"),
    ) if count]  # fmt: skip
    return " + ".join(f"{count}{where}, {_mib(size)}" for count, size, where in tiers) or "-"


def _mib(size: int) -> str:
    mib = size / 2**20
    return f"{mib:.1f} MiB" if mib < 10 else f"{mib:.0f} MiB"
