"""Reading a remote engine's reply: its lines (`reply_lines`), what each line carries
(`line_payload`: server-sent events or one JSON object a line), and the failure an error status
stands for (`status_failure`). Everything that goes wrong is a `ReplyFailure`, already classified
(see remote/core.py for the classes and what follows from each).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from bastion.protocol import ErrorCode
from bastion.worker.remote.dialects import Framing
from bastion.worker.remote.http_stream import StreamError, StreamResponse
from bastion.worker.remote.server_facts import excerpt

MAX_LINE_BYTES = 1024 * 1024  # a longer stream line is not any engine's protocol
ERROR_BODY_BYTES = 2048
END_OF_STREAM = object()  # OpenAI's `data: [DONE]`


class ReplyFailure(Exception):
    """Why a request to the remote failed, as the RequestFailed it becomes."""

    def __init__(self, code: ErrorCode, message: str, *, retryable: bool = False,
                 retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.retryable, self.retry_after_ms = code, message, retryable, retry_after_ms


async def status_failure(response: StreamResponse, where: str, default_retry_s: float) -> ReplyFailure:
    """The failure an error status (or a redirect) stands for, the server's words quoted; 429 and 503
    retryable after the server's Retry-After, else after `default_retry_s`."""
    try:
        body = await response.read_some(ERROR_BODY_BYTES)
    except StreamError as exc:  # the status says enough
        body = f"(its body: {exc.reason})".encode()
    text = excerpt(body.decode("utf-8", errors="replace"))
    status = f"{response.status_code} {response.reason_phrase}".strip()
    if response.status_code in (429, 503):
        after = retry_after_ms(response.headers.get("retry-after"))
        return ReplyFailure(ErrorCode.REMOTE_ERROR, f"{where} is busy ({status}): {text}", retryable=True,
                        retry_after_ms=after if after is not None else int(default_retry_s * 1000))  # fmt: skip
    hint = ""
    if response.status_code in (401, 403):
        hint = "; check the API key (api_key_env or api_key_file)"
    elif response.status_code == 404:
        hint = "; check `url` (the server's base, without /v1) and `engine`"
    return ReplyFailure(ErrorCode.REMOTE_ERROR, f"{where} answered {status}: {text}{hint}")


def retry_after_ms(value: str | None) -> int | None:
    try:
        return max(0, int(float(value) * 1000)) if value else None
    except ValueError:
        return None  # an HTTP date: not worth parsing for a bounded retry


async def reply_lines(response: StreamResponse) -> AsyncIterator[bytes | None]:
    """The response's lines, and None each time what has arrived is used up; refusing a line
    longer than MAX_LINE_BYTES instead of holding it all."""
    pending = b""
    async for chunk in response.body():
        if chunk is None:
            yield None
            continue
        pending += chunk
        while (cut := pending.find(b"\n")) >= 0:
            line, pending = pending[:cut], pending[cut + 1 :]
            yield line.rstrip(b"\r")
        if len(pending) > MAX_LINE_BYTES:
            raise ReplyFailure(ErrorCode.REMOTE_ERROR, f"the server sent a line longer than {MAX_LINE_BYTES} bytes")
    if pending.strip():
        yield pending


def line_payload(line: bytes, framing: Framing) -> Any:
    """The JSON a stream line carries (an SSE `error:` field as `{"error": ...}`); None for lines that carry
    none (SSE comments, blank lines, other fields); END_OF_STREAM for OpenAI's end marker."""
    if framing is Framing.SSE:
        if line.startswith(b"error:"):
            # llama.cpp's server sends a failure mid-reply as an `error:` field (followed by `data: [DONE]`
            # on its OpenAI-compatible endpoints): read as the `error` member the other engines send.
            text = line[6:].strip()
            try:
                return {"error": json.loads(text) or "an error without a message"}
            except ValueError:
                return {"error": text.decode(errors="replace") or "an error without a message"}
        if not line.startswith(b"data:"):
            return None  # event:, id:, retry:, a ': keep-alive' comment, the blank separator
        line = line[5:].strip()
        if line == b"[DONE]":
            return END_OF_STREAM
    elif not line.strip():
        return None
    try:
        return json.loads(line)
    except ValueError:
        raise ReplyFailure(ErrorCode.REMOTE_ERROR,
                       f"the server sent a line that is not JSON: {excerpt(line[:200].decode(errors='replace'))}") from None
