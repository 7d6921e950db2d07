"""Reasoning told apart from the answer, in a whole reply or as it streams.

Models write their reasoning before (and sometimes between) the parts of
their answer, each family with its own markers:
    <think>...</think>                       DeepSeek R1, Qwen3, QwQ, GLM, Kimi, MiniMax, Granite, Nemotron
    <seed:think>...</seed:think>              Seed-OSS
    [THINK]...[/THINK]                       Magistral, Ministral 3 (Mistral)
    <|START_THINKING|>...<|END_THINKING|>    Command R7B
    <|inner_prefix|>...<|inner_suffix|>      Apertus
    <|channel|>analysis<|message|>...<|end|> GPT-OSS harmony (harmony.py)
A reply may start inside reasoning, unclosed, when the prompt itself opened it
(DeepSeek R1 distills, QwQ and some Qwen3 and GLM templates end the
generation prompt with `<think>\\n`): `prompt_opens_reasoning` tells from
the prompt's tail. Reasoning left open when the reply ends stays reasoning:
the model never got to its answer.

Owns `ReasoningFormat`, `split_reasoning` (a whole reply into reasoning and
content; content is what the call parser reads, so a call the model only
quoted while thinking is never run) and `ReasoningSplitter`, which does the
same to a stream of deltas, yielding tagged `Piece`s and holding back only
what could still become a marker. One is the other fed all at once, so the
pieces of any cut of a reply add up to exactly its one-shot split; neither
strips whitespace around markers (strip for display). It reads text only.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import msgspec

from bastion.supervisor.tools.harmony import HarmonyChannels
from bastion.supervisor.tools.text_scan import Occurrences, partial_suffix


class ReasoningFormat(enum.Enum):
    NONE = "none"  # no reasoning markers: everything is content
    THINK_TAGS = "think_tags"  # <think>...</think>
    SEED = "seed"  # <seed:think>...</seed:think>
    MISTRAL = "mistral"  # [THINK]...[/THINK]
    COMMAND_R = "command_r"  # <|START_THINKING|>...<|END_THINKING|>
    APERTUS = "apertus"  # <|inner_prefix|>...<|inner_suffix|>
    HARMONY = "harmony"  # GPT-OSS channels: analysis is reasoning; final and commentary are content


_MARKERS: dict[ReasoningFormat, tuple[str, str]] = {
    ReasoningFormat.THINK_TAGS: ("<think>", "</think>"),
    ReasoningFormat.SEED: ("<seed:think>", "</seed:think>"),
    ReasoningFormat.MISTRAL: ("[THINK]", "[/THINK]"),
    ReasoningFormat.COMMAND_R: ("<|START_THINKING|>", "<|END_THINKING|>"),
    ReasoningFormat.APERTUS: ("<|inner_prefix|>", "<|inner_suffix|>"),
}
# The prompt of a harmony model that opened the analysis message for it.
_HARMONY_OPENER = "<|channel|>analysis<|message|>"


class PieceKind(enum.Enum):
    REASONING = "reasoning"
    CONTENT = "content"


class Piece(msgspec.Struct, frozen=True):
    kind: PieceKind
    text: str


class ReasoningSplit(msgspec.Struct, frozen=True):
    reasoning: str  # shown and stored apart from the answer
    content: str  # the answer, tool calls included: what parse_tool_calls reads


class ReasoningSplitter:
    """Splits a reply as it streams: `feed` each delta, then `flush` once at the end."""

    def __init__(self, fmt: ReasoningFormat, *, starts_inside: bool = False) -> None:
        self._harmony = (
            HarmonyChannels(starts_inside=starts_inside) if fmt is ReasoningFormat.HARMONY else None
        )
        self._markers = _MARKERS.get(fmt)
        self._inside = starts_inside and self._markers is not None
        self._held = ""

    def feed(self, delta: str) -> list[Piece]:
        if self._harmony is not None:
            return _pieces(self._harmony.feed(delta))
        if self._markers is None:
            return [Piece(PieceKind.CONTENT, delta)] if delta else []
        return self._split_pairs(self._held + delta)

    def flush(self) -> list[Piece]:
        """What was held back; the reply has ended, so a half-written marker is only text."""
        if self._harmony is not None:
            return _pieces(self._harmony.flush())
        rest, self._held = self._held, ""
        return self._piece(rest)

    def _split_pairs(self, text: str) -> list[Piece]:
        assert self._markers is not None
        pieces: list[Piece] = []
        found, pos = Occurrences(text), 0
        while True:
            marker = self._markers[1] if self._inside else self._markers[0]
            at = found.next(marker, pos)
            if at < 0:
                break
            pieces += self._piece(text[pos:at])
            pos, self._inside = at + len(marker), not self._inside
        keep = len(text) - partial_suffix(text, pos, (marker,))
        pieces += self._piece(text[pos:keep])
        self._held = text[keep:]
        return pieces

    def _piece(self, text: str) -> list[Piece]:
        return [Piece(PieceKind.REASONING if self._inside else PieceKind.CONTENT, text)] if text else []


def split_reasoning(reply: str, fmt: ReasoningFormat, *, starts_inside: bool = False) -> ReasoningSplit:
    """The reasoning in `reply` and the content around it; exactly what streaming it would give."""
    splitter = ReasoningSplitter(fmt, starts_inside=starts_inside)
    return join_pieces([*splitter.feed(reply), *splitter.flush()])


def join_pieces(pieces: Iterable[Piece]) -> ReasoningSplit:
    reasoning: list[str] = []
    content: list[str] = []
    for piece in pieces:
        (reasoning if piece.kind is PieceKind.REASONING else content).append(piece.text)
    return ReasoningSplit(reasoning="".join(reasoning), content="".join(content))


def prompt_opens_reasoning(prompt: str, fmt: ReasoningFormat | None = None) -> bool:
    """Whether generation starts inside reasoning: the rendered prompt ends with an opened marker
    (`...<|im_start|>assistant\\n<think>\\n`), so the reply will only close it. Without a format,
    any family's opening marker counts."""
    tail = prompt.rstrip()
    return any(tail.endswith(opener) for opener in _openers(fmt))


def _openers(fmt: ReasoningFormat | None) -> tuple[str, ...]:
    if fmt is None:
        return (_HARMONY_OPENER, *(opener for opener, _ in _MARKERS.values()))
    if fmt is ReasoningFormat.HARMONY:
        return (_HARMONY_OPENER,)
    markers = _MARKERS.get(fmt)
    return (markers[0],) if markers is not None else ()


def guess_reasoning_format(template: str) -> ReasoningFormat:
    """The reasoning markers a chat template (or a prompt it rendered) uses; <think> when it shows none,
    since a reply without them then splits into all content anyway."""
    for marker, fmt in _TELLTALES:
        if marker in template:
            return fmt
    return ReasoningFormat.THINK_TAGS


_TELLTALES = (
    ("<|channel|>", ReasoningFormat.HARMONY),
    ("<seed:think>", ReasoningFormat.SEED),
    ("[THINK]", ReasoningFormat.MISTRAL),
    ("<|START_THINKING|>", ReasoningFormat.COMMAND_R),
    ("<|inner_prefix|>", ReasoningFormat.APERTUS),
)


def _pieces(parts: list[tuple[bool, str]]) -> list[Piece]:
    return [Piece(PieceKind.REASONING if reasoning else PieceKind.CONTENT, text) for reasoning, text in parts]
