"""The five scenarios of the comparison; each returns its raw figures as JSON-ready data.

growing, alternating: bastion, the peer with its defaults and the peer with
its RAM cache, side by side and interleaved turn by turn (the order rotates)
so drift on a shared machine hits all three alike. resume, concurrent,
latency: bastion alone (the peer has no sessions to resume, one model per
server, and no cancel besides dropping the connection).
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vs_peer_bastion import ModelEntry, PrivateBastion
from vs_peer_reply import Reply
from vs_peer_server import PeerServer, PeerSettings
from vs_peer_text import Tokenizer, user_text

MODEL = "bench"
SYSTEMS = ("bastion", "peer", "peer_cache")


@dataclass(frozen=True)
class Profile:
    n_ctx: int = 4096
    threads: int = 2
    user_tokens: int = 200
    reply_tokens: int = 40
    growing_turns: int = 24
    alternating_turns: int = 8  # per session
    resume_tokens: int = 1500
    full_prefill_runs: int = 2
    concurrent_tokens: int = 256
    concurrent_runs: int = 3
    concurrent_threads: int | None = None  # per model; None: `threads`
    latency_runs: int = 15
    latency_after_tokens: int = 16
    latency_max_tokens: int = 1024


# Small enough to check every scenario in a few minutes, and still past the
# context in the growing chat (the peer fails at turn 5 or 6).
QUICK = Profile(
    n_ctx=512, user_tokens=80, reply_tokens=8, growing_turns=7, alternating_turns=2, resume_tokens=250,
    full_prefill_runs=1, concurrent_tokens=32, concurrent_runs=1, latency_runs=2, latency_after_tokens=8,
    latency_max_tokens=128,
)  # fmt: skip


@dataclass
class Bench:
    profile: Profile
    model: Path
    tokenizer: Tokenizer
    workdir: Path  # homes and peer logs
    say: Callable[[str], None]
    # End-of-generation tokens: the peer gets them banned so its replies, like
    # bastion's (ignore_eos), always run to the reply length.
    banned: list[int]

    def bastion(self, name: str, models: tuple[str, ...] = (MODEL,), threads: int | None = None,
                supervisor_args: tuple[str, ...] = ()) -> PrivateBastion:  # fmt: skip
        """A supervisor in a home of its own: no sessions left over from an earlier run."""
        home = Path(tempfile.mkdtemp(prefix=f"home-{name}-", dir=self.workdir))
        entry = ModelEntry(path=self.model, n_ctx=self.profile.n_ctx, threads=threads or self.profile.threads)
        return PrivateBastion(home, dict.fromkeys(models, entry), lambda m: self.say(f"  {m}"), supervisor_args)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


def row(system: str, session: str, turn: int, reply: Reply, prompt_tokens: int | None) -> dict[str, Any]:
    stats = reply.details.get("stats", {})
    return {
        "system": system,
        "session": session,
        "turn": turn,
        "ttft_ms": None if reply.ttft_ms is None else round(reply.ttft_ms, 1),
        "prompt_tokens": prompt_tokens,
        "cached_tokens": stats.get("cached_tokens"),
        "completion_tokens": reply.completion_tokens,
        "total_ms": ms(None if reply.end_at is None else reply.end_at - reply.sent_at),
        "error": reply.error,
        "details": reply.details,
    }


class PeerChat:
    """One conversation with a peer, kept client-side as an OpenAI client keeps it."""

    def __init__(self, peer: PeerServer, bench: Bench) -> None:
        self.peer = peer
        self.bench = bench
        self.messages: list[dict[str, str]] = []
        self.failed_at: int | None = None

    def turn(self, system: str, session: str, turn: int, text: str) -> dict[str, Any]:
        self.messages.append({"role": "user", "content": text})
        prompt_tokens = self.bench.tokenizer.prompt_tokens(self.messages)
        reply = self.peer.chat(self.messages, self.bench.profile.reply_tokens, self.bench.banned)
        if reply.error is None:
            self.messages.append({"role": "assistant", "content": reply.text})
        elif self.failed_at is None:
            self.failed_at = turn
        return row(system, session, turn, reply, prompt_tokens)


class ThreeSystems:
    """bastion and the two peers, started for one scenario and always stopped."""

    def __init__(self, bench: Bench, scenario: str) -> None:
        self.bench = bench
        self.scenario = scenario
        self.peers: dict[str, PeerServer] = {}
        self.startup_s: dict[str, float] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> ThreeSystems:
        bench, p = self.bench, self.bench.profile
        try:
            for name, cache in (("peer", False), ("peer_cache", True)):
                peer = PeerServer(PeerSettings(bench.model, p.n_ctx, p.threads, cache),
                                  bench.workdir / f"{self.scenario}-{name}.log")  # fmt: skip
                self._stack.callback(peer.close)
                self.startup_s[name] = round(peer.start(), 2)
                bench.say(f"  {name} ready in {self.startup_s[name]} s: {' '.join(peer.command()[1:])}")
                self.peers[name] = peer
            started = time.perf_counter()
            self.bastion = bench.bastion(self.scenario)
            self._stack.callback(self.bastion.close)
            self.bastion.load(MODEL)
            self.startup_s["bastion"] = round(time.perf_counter() - started, 2)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stack.close()

    def bastion_turn(self, session: str, turn: int, text: str) -> dict[str, Any]:
        reply = self.bastion.run(text, model=MODEL, max_tokens=self.bench.profile.reply_tokens, session=session)
        return row("bastion", session, turn, reply, reply.details.get("stats", {}).get("prompt_tokens"))

    def memory(self) -> dict[str, int]:
        """Resident bytes per system; bastion's worker holds its RAM snapshots, so they are in its RSS."""
        status = self.bastion.status(MODEL)
        peers = {name: peer.rss_bytes() for name, peer in self.peers.items()}
        if status is None:
            return peers
        return {"bastion": status.rss_bytes, **peers, "bastion_snapshot_ram": status.snapshot_ram_bytes,
                "bastion_snapshot_disk": status.snapshot_disk_bytes}  # fmt: skip


def rotated(turn: int) -> tuple[str, ...]:
    k = turn % len(SYSTEMS)
    return SYSTEMS[k:] + SYSTEMS[:k]


def progress_line(rows: list[dict[str, Any]]) -> str:
    parts = []
    for r in sorted(rows, key=lambda r: SYSTEMS.index(r["system"])):
        if r["error"]:
            parts.append(f"{r['system']} FAILED ({r['error'][:90]})")
            continue
        cached = f", cached {r['cached_tokens']}" if r["cached_tokens"] is not None else ""
        parts.append(f"{r['system']} {r['ttft_ms']:.0f} ms (prompt {r['prompt_tokens']}{cached})")
    return " | ".join(parts)


def growing(bench: Bench) -> dict[str, Any]:
    p = bench.profile
    rows: list[dict[str, Any]] = []
    with ThreeSystems(bench, "growing") as systems:
        chats = {name: PeerChat(peer, bench) for name, peer in systems.peers.items()}
        for turn in range(1, p.growing_turns + 1):
            text = user_text(bench.tokenizer, f"of one long chat, turn {turn}", p.user_tokens)
            done = []
            for system in rotated(turn):
                if system == "bastion":
                    done.append(systems.bastion_turn("grow", turn, text))
                elif chats[system].failed_at is None:
                    done.append(chats[system].turn(system, "grow", turn, text))
            rows += done
            bench.say(f"growing turn {turn}/{p.growing_turns}: {progress_line(done)}")
        memory = systems.memory()
    return {"rows": rows, "startup_s": systems.startup_s, "rss_bytes": memory}


def alternating(bench: Bench) -> dict[str, Any]:
    p = bench.profile
    rows: list[dict[str, Any]] = []
    with ThreeSystems(bench, "alternating") as systems:
        chats = {(name, s): PeerChat(peer, bench) for name, peer in systems.peers.items() for s in "AB"}
        for turn in range(1, p.alternating_turns + 1):
            for session in "AB":
                text = user_text(bench.tokenizer, f"of chat {session}, turn {turn}", p.user_tokens)
                done = []
                for system in rotated(2 * turn + (session == "B")):
                    if system == "bastion":
                        done.append(systems.bastion_turn(f"alt-{session}", turn, text))
                    else:
                        done.append(chats[(system, session)].turn(system, session, turn, text))
                    done[-1]["session"] = session
                rows += done
                bench.say(f"alternating {session}{turn}/{p.alternating_turns}: {progress_line(done)}")
        memory = systems.memory()
    return {"rows": rows, "startup_s": systems.startup_s, "rss_bytes": memory}


def resume(bench: Bench) -> dict[str, Any]:
    """Kill the worker under a long session; the next turn's TTFT against a full prefill of that size."""
    p = bench.profile
    bastion = bench.bastion("resume")
    try:
        bastion.load(MODEL)
        build: list[dict[str, Any]] = []
        turn = 0
        while not build or _conversation_tokens(build[-1]) < p.resume_tokens:
            turn += 1
            text = user_text(bench.tokenizer, f"of the chat to resume, turn {turn}", p.user_tokens)
            reply = bastion.run(text, model=MODEL, max_tokens=p.reply_tokens, session="resume")
            build.append(row("bastion", "resume", turn, reply, reply.details.get("stats", {}).get("prompt_tokens")))
            bench.say(f"resume: building, turn {turn}: {progress_line(build[-1:])}")
            if reply.error:
                raise RuntimeError(f"building the session failed: {reply.error}")
        pid = build[-1]["details"]["worker_pid"]
        os.kill(pid, signal.SIGKILL)
        bastion.wait_worker_replaced(MODEL, pid)
        bench.say(f"resume: killed worker {pid} under a {_conversation_tokens(build[-1])}-token session")
        turn += 1
        text = user_text(bench.tokenizer, f"of the chat to resume, turn {turn}", p.user_tokens)
        reply = bastion.run(text, model=MODEL, max_tokens=p.reply_tokens, session="resume")
        resumed = row("bastion", "resume", turn, reply, reply.details.get("stats", {}).get("prompt_tokens"))
        bench.say(f"resume: next turn after the kill: {progress_line([resumed])}")
        full = [_full_prefill(bench, bastion, resumed["prompt_tokens"] or p.resume_tokens, k)
                for k in range(p.full_prefill_runs)]  # fmt: skip
    finally:
        bastion.close()
    return {"build": build, "resumed": resumed, "full_prefill": full}


def _conversation_tokens(r: dict[str, Any]) -> int:
    return (r["prompt_tokens"] or 0) + r["completion_tokens"]


def _full_prefill(bench: Bench, bastion: PrivateBastion, prompt_tokens: int, k: int) -> dict[str, Any]:
    """A one-shot prompt of `prompt_tokens` sharing nothing with any session: a cold prefill of that size."""
    overhead = bench.tokenizer.prompt_tokens([{"role": "user", "content": "x"}]) - bench.tokenizer.count("x")
    text = user_text(bench.tokenizer, f"for a cold prefill, run {k + 1}", prompt_tokens - overhead)
    reply = bastion.run(text, model=MODEL, max_tokens=bench.profile.reply_tokens)
    result = row("bastion", "", k + 1, reply, reply.details.get("stats", {}).get("prompt_tokens"))
    bench.say(f"resume: full prefill reference {k + 1}: {progress_line([result])}")
    return result


# How the supervisor shares the cores among workers generating at once
# (supervisor/processes/cores.py): the default, each worker on all its threads, and the
# default plus pinning each busy worker to its own cores.
CONCURRENT_VARIANTS = {
    "shared": (),
    "unshared": ("--no-share-cores",),
    "pinned": ("--pin-cores",),
}


def concurrent(bench: Bench) -> dict[str, Any]:
    """Two models decoding at once against one alone: aggregate decode tokens/s,
    once per way of sharing the cores."""
    variants = {name: _concurrent_variant(bench, name, args) for name, args in CONCURRENT_VARIANTS.items()}
    return {"variants": variants, "models": ["bench-a", "bench-b"]}


def _concurrent_variant(bench: Bench, variant: str, supervisor_args: tuple[str, ...]) -> dict[str, Any]:
    p = bench.profile
    names = ("bench-a", "bench-b")
    runs: list[dict[str, Any]] = []
    bastion = bench.bastion(f"concurrent-{variant}", names, p.concurrent_threads, supervisor_args)
    try:
        for name in names:
            bastion.load(name)
            bastion.run("Say hello.", model=name, max_tokens=4)  # first-run costs stay out of the figures
        for r in range(p.concurrent_runs):
            alone_model = names[r % 2]
            steps = ["alone", "together"] if r % 2 == 0 else ["together", "alone"]
            result: dict[str, Any] = {"run": r + 1}
            for step in steps:
                if step == "alone":
                    reply = bastion.run(_story(r, "alone"), model=alone_model, max_tokens=p.concurrent_tokens)
                    result["alone"] = {"model": alone_model, "decode_tok_s": round(reply.decode_tokens_per_s, 2),
                                       "tokens": reply.completion_tokens, "error": reply.error}  # fmt: skip
                else:
                    requests = [bastion.request(_story(r, name), model=name, max_tokens=p.concurrent_tokens)
                                for name in names]  # fmt: skip
                    replies = bastion.run_many(requests)
                    result["together"] = _together(replies)
            runs.append(result)
            bench.say(
                f"concurrent ({variant}) run {r + 1}/{p.concurrent_runs}: alone {result['alone']['decode_tok_s']:.1f}"
                f" tok/s, together {result['together']['aggregate_tok_s']:.1f} tok/s aggregate "
                f"({' + '.join(f'{s:.1f}' for s in result['together']['per_stream_tok_s'])})"
            )
    finally:
        bastion.close()
    return {"runs": runs, "supervisor_args": list(supervisor_args)}


def _story(r: int, who: str) -> str:
    return f"Run {r + 1}, {who}: write a long story about a lighthouse keeper and a travelling clockmaker."


def _together(replies: list[Reply]) -> dict[str, Any]:
    """Tokens that arrived while both streams were decoding, over that window."""
    times = [reply.token_times for reply in replies]
    start = max(t[0] for t in times) if all(times) else 0.0
    end = min(t[-1] for t in times) if all(times) else 0.0
    in_window = sum(1 for t in times for at in t if start < at <= end)
    return {
        "aggregate_tok_s": round(in_window / (end - start), 2) if end > start else 0.0,
        "overlap_s": round(max(0.0, end - start), 3),
        "per_stream_tok_s": [round(reply.decode_tokens_per_s, 2) for reply in replies],
        "tokens": [reply.completion_tokens for reply in replies],
        "errors": [reply.error for reply in replies if reply.error],
    }


def latency(bench: Bench) -> dict[str, Any]:
    """Crash detection (kill -9 mid-decode → error event) and cancel (Cancel → end event), interleaved."""
    p = bench.profile
    crash: list[dict[str, Any]] = []
    cancel: list[dict[str, Any]] = []
    bastion = bench.bastion("latency")
    try:
        for i in range(p.latency_runs):
            bastion.load(MODEL)  # a fresh worker after the last kill, started outside the timing
            cancel.append(_cancel_once(bench, bastion, i))
            crash.append(_crash_once(bench, bastion, i))
            bench.say(
                f"latency run {i + 1}/{p.latency_runs}: cancel → run_end {cancel[-1]['latency_ms']} ms "
                f"({cancel[-1]['stop_reason']}), kill -9 → error {crash[-1]['latency_ms']} ms "
                f"({crash[-1]['error_code']})"
            )
    finally:
        bastion.close()
    return {"cancel": cancel, "crash": crash}


def _cancel_once(bench: Bench, bastion: PrivateBastion, i: int) -> dict[str, Any]:
    p = bench.profile
    request = bastion.request(_story(i, "cancelled"), model=MODEL, max_tokens=p.latency_max_tokens)
    mark: dict[str, float | int] = {}

    def on_token(reply: Reply) -> None:
        if reply.completion_tokens >= p.latency_after_tokens and not mark:
            mark["at"], mark["tokens"] = time.perf_counter(), reply.completion_tokens
            bastion.cancel(request.request_id)

    reply = bastion.run_many([request], on_token)[0]
    at = mark.get("at")
    return {
        "latency_ms": ms(reply.end_at - at) if at and reply.end_at else None,
        "stop_reason": reply.details.get("stop_reason"),
        "tokens_after_cancel": reply.completion_tokens - int(mark.get("tokens", 0)),
        "error": reply.error,
    }


def _crash_once(bench: Bench, bastion: PrivateBastion, i: int) -> dict[str, Any]:
    p = bench.profile
    mark: dict[str, float | int] = {}

    def on_token(reply: Reply) -> None:
        if reply.completion_tokens >= p.latency_after_tokens and not mark:
            mark["pid"] = reply.details["worker_pid"]
            mark["at"] = time.perf_counter()
            os.kill(int(mark["pid"]), signal.SIGKILL)

    reply = bastion.run(_story(i, "crashed"), model=MODEL, max_tokens=p.latency_max_tokens, on_token=on_token)
    at = mark.get("at")
    if "pid" in mark:
        bastion.wait_worker_replaced(MODEL, int(mark["pid"]))
    return {
        "latency_ms": ms(reply.error_at - at) if at and reply.error_at else None,
        "end_ms": ms(reply.end_at - at) if at and reply.end_at else None,
        "error_code": reply.details.get("error_code"),
        "stop_reason": reply.details.get("stop_reason"),
    }
