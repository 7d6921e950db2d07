"""GPT-OSS's harmony format: a reply is a run of messages, each on a channel.

A message is a header, `<|message|>`, a body, and an end token:
    <|channel|>analysis<|message|>...<|end|>              reasoning
    <|start|>assistant<|channel|>final<|message|>...      the answer (generation stops at <|return|>)
    <|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>   a tool call
The recipient (`to=...`) may also sit in the role part, before the channel
(`<|start|>assistant to=functions.NAME<|channel|>commentary json<|message|>`),
and a call may even come on the analysis channel (llama.cpp's test-chat.cpp
accepts both). Commentary without a recipient is a preamble the user may see:
content. The first header has no `<|start|>assistant`: the prompt ends with it.

Owns reading a header (`recipient_of`, `channel_of`) and `HarmonyChannels`,
the incremental splitter of a reply into reasoning and content, where each
call is rewritten as `<|channel|>commentary to=NAME<|message|>{...}<|call|>`,
the form the call parser reads. Text that never reaches a `<|message|>`
within a header's length is not harmony at all: it is content.
"""

from __future__ import annotations

import re

from bastion.supervisor.tools.text_scan import Occurrences, partial_suffix

MESSAGE = "<|message|>"
# Where a body ends: its own end tokens, or a new message that forgot to end this one.
_BODY_ENDS = ("<|end|>", "<|call|>", "<|return|>", "<|start|>", "<|channel|>")
_CONSUMED_ENDS = frozenset(("<|end|>", "<|call|>", "<|return|>"))
# A header is short; text running this long without <|message|> is plain content.
MAX_HEADER = 256
_RECIPIENT = re.compile(r"(?:^|[\s>|])to=([^\s<]+)")
_CHANNEL = re.compile(r"<\|channel\|>\s*([\w-]+)")
# What is left when a reply stops between messages: no content in it.
_BARE_HEADER = re.compile(r"\s*(?:<\|start\|>\s*assistant\s*)?(?:<\|channel\|>\s*[\w-]*\s*)?")


def recipient_of(header: str) -> str | None:
    found = _RECIPIENT.search(header)
    return found.group(1) if found else None


def channel_of(header: str) -> str | None:
    found = _CHANNEL.search(header)
    return found.group(1) if found else None


def call_header(recipient: str) -> str:
    """The header a call is rewritten with for the call parser."""
    return f"<|channel|>commentary to={recipient}{MESSAGE}"


class HarmonyChannels:
    """Fed a reply piece by piece, yields (is_reasoning, text) pieces; `flush` at the end. The pieces
    are the same however the reply is cut: only what could still begin a token is held back."""

    def __init__(self, *, starts_inside: bool = False) -> None:
        self._held = ""
        self._in_body = starts_inside  # the prompt opened the analysis message itself
        self._reasoning = starts_inside
        self._call = False

    def feed(self, delta: str) -> list[tuple[bool, str]]:
        text, pos = self._held + delta, 0
        ends = Occurrences(text)
        out: list[tuple[bool, str]] = []
        while True:
            step = (
                self._body_step(text, pos, ends, out) if self._in_body else self._header_step(text, pos, out)
            )
            if step is None:
                break
            pos = step
        return out

    def flush(self) -> list[tuple[bool, str]]:
        out = self.feed("")
        rest, self._held = self._held, ""
        if self._in_body:
            _emit(out, self._reasoning, rest)
        elif not _BARE_HEADER.fullmatch(rest):
            _emit(out, False, rest)  # a header cut short: the call parser reports a half-written call
        return out

    def _header_step(self, text: str, pos: int, out: list[tuple[bool, str]]) -> int | None:
        """Where the scan goes on after the header at `pos`; None when more text is needed."""
        window = pos + MAX_HEADER + len(MESSAGE)
        found = text.find(MESSAGE, pos, window)
        if found >= 0:
            self._open(out, text[pos:found])
            return found + len(MESSAGE)
        if len(text) >= window:  # not harmony: plain content
            self._in_body, self._reasoning, self._call = True, False, False
            # Step past the token that opened the would-be header, or the body would stop at it again.
            _emit(out, False, text[pos])
            return pos + 1
        self._held = text[pos:]
        return None

    def _open(self, out: list[tuple[bool, str]], header: str) -> None:
        recipient = recipient_of(header)
        self._in_body, self._call = True, recipient is not None
        self._reasoning = recipient is None and channel_of(header) == "analysis"
        if recipient is not None:
            _emit(out, False, call_header(recipient))

    def _body_step(self, text: str, pos: int, ends: Occurrences, out: list[tuple[bool, str]]) -> int | None:
        found, token = ends.earliest(_BODY_ENDS, pos)
        if token:
            _emit(out, self._reasoning, text[pos:found])
            if self._call:
                _emit(out, False, "<|call|>")
            self._in_body = self._call = self._reasoning = False
            return found + (len(token) if token in _CONSUMED_ENDS else 0)
        keep = len(text) - partial_suffix(text, pos, _BODY_ENDS)
        _emit(out, self._reasoning, text[pos:keep])
        self._held = text[keep:]
        return None


def _emit(out: list[tuple[bool, str]], reasoning: bool, text: str) -> None:
    if text:
        out.append((reasoning, text))
