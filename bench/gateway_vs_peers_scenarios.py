"""The three scenarios of the gateway comparison; each returns its raw figures as JSON-ready data.

Every server is driven the same way, as a stateless OpenAI client drives it:
the whole message list each turn, streamed, the server's own reply appended to
that server's copy of the chat. The servers of a scenario run side by side and
are interleaved request by request, the order rotating, so drift on a shared
machine hits all alike.

  growing      one chat growing turn by turn: TTFT per turn
  interleaved  several chats advanced round-robin: TTFT per turn of each chat,
               which shows whether a server keeps each chat's prefix while it serves the others
  concurrent   several streams sent at once, long replies: aggregate decode tokens/s
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from gateway_vs_peers_client import ChatClient, cached_tokens, completion_tokens
from gateway_vs_peers_servers import Servers, ServerSettings
from vs_peer_reply import Reply
from vs_peer_text import Tokenizer, user_text


@dataclass(frozen=True)
class Profile:
    n_ctx: int = 4096
    threads: int = 2
    user_tokens: int = 150
    reply_tokens: int = 32
    growing_turns: int = 12
    interleaved_chats: int = 4
    interleaved_turns: int = 6  # per chat
    concurrent_streams: int = 4
    concurrent_tokens: int = 128  # per stream
    concurrent_runs: int = 3


# A smoke test of every scenario and every server in well under two minutes.
QUICK = Profile(user_tokens=60, reply_tokens=8, growing_turns=2, interleaved_chats=2, interleaved_turns=2,
                concurrent_streams=2, concurrent_tokens=16, concurrent_runs=1)  # fmt: skip


@dataclass
class Bench:
    profile: Profile
    servers: list[str]  # keys of gateway_vs_peers_servers.SERVERS, bastion first
    settings: ServerSettings
    tokenizer: Tokenizer
    say: Callable[[str], None]

    def start(self) -> Servers:
        return Servers(self.servers, self.settings, self.say)

    def rotated(self, k: int) -> list[str]:
        shift = k % len(self.servers)
        return self.servers[shift:] + self.servers[:shift]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


class Chat:
    """One conversation with one server, kept client-side."""

    def __init__(self, server: str, name: str, client: ChatClient, bench: Bench) -> None:
        self.server = server
        self.name = name
        self.client = client
        self.bench = bench
        self.messages: list[dict[str, str]] = []
        self.failed = False

    def turn(self, turn: int, text: str) -> dict[str, Any]:
        self.messages.append({"role": "user", "content": text})
        prompt_tokens = self.bench.tokenizer.prompt_tokens(self.messages)
        reply = self.client.chat(self.messages, self.bench.profile.reply_tokens)
        if reply.error is None:
            self.messages.append({"role": "assistant", "content": reply.text})
        else:
            self.failed = True  # as a client would: a chat whose turn failed goes no further
        usage = reply.details.get("usage") or {}
        return {
            "server": self.server,
            "chat": self.name,
            "turn": turn,
            "ttft_ms": None if reply.error or reply.ttft_ms is None else round(reply.ttft_ms, 1),
            "prompt_tokens": prompt_tokens,  # the model's tokenizer and template, the same count for every server
            "server_prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": cached_tokens(reply),
            "completion_tokens": completion_tokens(reply),
            "total_ms": _ms(None if reply.end_at is None else reply.end_at - reply.sent_at),
            "error": reply.error,
        }


def progress_line(rows: list[dict[str, Any]], order: list[str]) -> str:
    parts = []
    for r in sorted(rows, key=lambda r: order.index(r["server"])):
        if r["error"]:
            parts.append(f"{r['server']} FAILED ({r['error'][:90]})")
            continue
        cached = f", cached {r['cached_tokens']}" if r["cached_tokens"] is not None else ""
        parts.append(f"{r['server']} {r['ttft_ms']:.0f} ms (prompt {r['prompt_tokens']}{cached})")
    return " | ".join(parts)


def growing(bench: Bench) -> dict[str, Any]:
    p = bench.profile
    rows: list[dict[str, Any]] = []
    with bench.start() as servers:
        chats = {key: Chat(key, "grow", client, bench) for key, client in servers.clients.items()}
        for turn in range(1, p.growing_turns + 1):
            text = user_text(bench.tokenizer, f"of one growing chat, turn {turn}", p.user_tokens)
            done = [chats[key].turn(turn, text) for key in bench.rotated(turn) if not chats[key].failed]
            rows += done
            bench.say(f"growing turn {turn}/{p.growing_turns}: {progress_line(done, bench.servers)}")
    return {"rows": rows, "startup": servers.startup}


def interleaved(bench: Bench) -> dict[str, Any]:
    p = bench.profile
    names = [chr(ord("A") + i) for i in range(p.interleaved_chats)]
    rows: list[dict[str, Any]] = []
    with bench.start() as servers:
        chats = {(key, name): Chat(key, name, client, bench) for key, client in servers.clients.items()
                 for name in names}  # fmt: skip
        step = 0
        for turn in range(1, p.interleaved_turns + 1):
            for name in names:
                step += 1
                # Each chat opens with different words, so no two share a prefix beyond the template's.
                text = user_text(bench.tokenizer, f"of chat {name}, turn {turn}", p.user_tokens)
                done = [chats[(key, name)].turn(turn, text) for key in bench.rotated(step)
                        if not chats[(key, name)].failed]  # fmt: skip
                rows += done
                bench.say(f"interleaved chat {name} turn {turn}/{p.interleaved_turns}: "
                          f"{progress_line(done, bench.servers)}")  # fmt: skip
    return {"rows": rows, "chats": names, "startup": servers.startup}


_TOPICS = ("a lighthouse keeper and a travelling clockmaker", "a river barge that carries a library",
           "two rival bakers in a mountain village", "a cartographer who maps a city that keeps moving",
           "an orchard that grows a different fruit every night", "a tunnel digger who finds a buried ship",
           "a violin maker and her very old cat", "a ferry pilot during the longest winter")  # fmt: skip


def _story(run: int, stream: int) -> str:
    return f"Run {run}, stream {stream}: write a long story about {_TOPICS[stream % len(_TOPICS)]}."


def concurrent(bench: Bench) -> dict[str, Any]:
    p = bench.profile
    runs: list[dict[str, Any]] = []
    with bench.start() as servers:
        for run in range(1, p.concurrent_runs + 1):
            for key in bench.rotated(run):
                result = _streams_at_once(servers.clients[key], run, p)
                runs.append({"server": key, "run": run, **result})
                errors = f", errors: {result['errors'][0][:90]}" if result["errors"] else ""
                bench.say(f"concurrent run {run}/{p.concurrent_runs} {key}: {result['aggregate_tok_s']:.1f} tok/s "
                          f"aggregate, tokens {result['tokens']}, TTFT {result['ttft_ms']} ms{errors}")  # fmt: skip
    return {"runs": runs, "startup": servers.startup}


def _streams_at_once(client: ChatClient, run: int, p: Profile) -> dict[str, Any]:
    """Send every stream at once; tokens after the first to arrive, over the time from it to the last."""
    prompts = [[{"role": "user", "content": _story(run, k)}] for k in range(p.concurrent_streams)]
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        replies: list[Reply] = list(pool.map(lambda m: client.chat(m, p.concurrent_tokens), prompts))
    sent = min(r.sent_at for r in replies)
    firsts = [r.first_token_at for r in replies if r.first_token_at is not None]
    lasts = [r.token_times[-1] for r in replies if r.token_times]
    tokens = [completion_tokens(r) for r in replies]
    window = max(lasts) - min(firsts) if firsts and lasts else 0.0
    return {
        "aggregate_tok_s": round((sum(tokens) - 1) / window, 2) if window > 0 else 0.0,
        "window_s": round(window, 3),
        "wall_s": round(max(lasts) - sent, 3) if lasts else None,
        "tokens": tokens,
        "ttft_ms": [_ms(None if r.first_token_at is None else r.first_token_at - sent) for r in replies],
        "last_token_ms": [_ms(r.token_times[-1] - sent) if r.token_times else None for r in replies],
        "per_stream_tok_s": [round(r.decode_tokens_per_s, 2) for r in replies],
        "errors": [r.error for r in replies if r.error],
    }


SCENARIOS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "growing": growing,
    "interleaved": interleaved,
    "concurrent": concurrent,
}
