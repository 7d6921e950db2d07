"""One OpenAI client for every server of the gateway comparison: streamed chat completions, timed at the client.

`ChatClient.chat` posts a whole message list to `POST /v1/chat/completions`
with `stream: true`, greedy, and fills a `Reply` (bench/vs_peer_reply.py):
the time the request left, the first and every later content delta, the text,
and the final usage chunk when the server sends one
(`stream_options.include_usage`). A stream that ends without `[DONE]`, an
`error` line or a non-200 status is a `Reply.error`, never an exception, so a
scenario can record a server failing and go on.

Each server is asked to ignore the end of generation the way it understands:
bastion's gateway and llama-server take `ignore_eos`; llama-cpp-python's
server has no such field and gets the end-of-generation tokens banned through
`logit_bias`. Either way every reply runs to `max_tokens`.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from vs_peer_reply import Reply

_REQUEST_TIMEOUT_S = 900.0


class ChatClient:
    """A pooled HTTP client for one server; thread-safe, so concurrent streams may share it."""

    def __init__(self, base_url: str, model: str, end_of_generation: dict[str, Any]) -> None:
        self.base_url = base_url
        self.model = model
        self.end_of_generation = end_of_generation  # the body fields that make replies run to max_tokens
        self._http = httpx.Client(base_url=base_url, timeout=httpx.Timeout(_REQUEST_TIMEOUT_S, connect=10.0))

    def open_connection(self) -> None:
        """An OpenAI client keeps its connection pooled: open it before anything is timed."""
        self._http.get("/v1/models").raise_for_status()

    def close(self) -> None:
        self._http.close()

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> Reply:
        body = json.dumps({
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self.end_of_generation,
        }).encode()  # fmt: skip
        headers = {"Content-Type": "application/json"}
        reply = Reply(sent_at=time.perf_counter())
        try:
            with self._http.stream("POST", "/v1/chat/completions", content=body, headers=headers) as response:
                reply.details["http_status"] = response.status_code
                if response.status_code != 200:
                    reply.error = f"HTTP {response.status_code}: {response.read().decode(errors='replace')[:300]}"
                    reply.error_at = time.perf_counter()
                    return reply
                done = _read_stream(response, reply)
            reply.end_at = time.perf_counter()
            if not done and reply.error is None:
                reply.error = "HTTP 200, then the stream closed without " + (
                    "any data or [DONE]" if reply.first_token_at is None else "[DONE]"
                )
                reply.error_at = reply.end_at
        except httpx.HTTPError as exc:
            reply.error = f"{type(exc).__name__}: {exc}"
            reply.error_at = time.perf_counter()
        return reply


def _read_stream(response: httpx.Response, reply: Reply) -> bool:
    """Server-sent events into `reply`; True if the stream ended with [DONE]."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue  # blank separators and ": ping" comments
        data = line[5:].strip()
        if data == "[DONE]":
            return True
        chunk = json.loads(data)
        if "error" in chunk:
            reply.error = str(chunk["error"])[:300]
            reply.error_at = time.perf_counter()
            continue
        if chunk.get("usage"):
            reply.details["usage"] = chunk["usage"]
        if chunk.get("timings"):  # llama-server's own figures, cache_n among them
            reply.details["timings"] = chunk["timings"]
        delta = chunk["choices"][0].get("delta", {}) if chunk.get("choices") else {}
        if delta.get("content"):
            now = time.perf_counter()
            if reply.first_token_at is None:
                reply.first_token_at = now
            reply.token_times.append(now)
            reply.text += delta["content"]
            reply.completion_tokens += 1
    return False


def completion_tokens(reply: Reply) -> int:
    """Tokens generated: the server's own count when it sent usage, else the content deltas."""
    usage = reply.details.get("usage") or {}
    return int(usage.get("completion_tokens") or reply.completion_tokens)


def cached_tokens(reply: Reply) -> int | None:
    """Prompt tokens the server says it did not have to evaluate, when it says."""
    usage = reply.details.get("usage") or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is None and "timings" in reply.details:
        cached = reply.details["timings"].get("cache_n")
    return cached
