"""What a client may ask of a model call's sampling and tools: shared by `run` and `complete`."""

from __future__ import annotations

import enum

import msgspec

from bastion.protocol.common import TopLogprobs


class SamplingRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Sampling as a client asks for it. A sampler setting left None is the
    model's recommendation (its GGUF's `general.sampling.*`, else its family's
    published defaults, else bastion's; `run_start` says which applied); one
    given always wins."""

    max_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    loop_guard: bool = True
    logprobs: TopLogprobs | None = None  # see SamplingParams.logprobs


class ToolChoiceMode(enum.Enum):
    AUTO = "auto"  # the model calls a tool or answers; a call it opens is constrained to the schemas
    REQUIRED = "required"  # the first reply is a call of one of the tools
    NONE = "none"  # no tools are offered
    FUNCTION = "function"  # the first reply is a call of the named tool


class ToolChoice(msgspec.Struct, frozen=True, kw_only=True):
    mode: ToolChoiceMode = ToolChoiceMode.AUTO
    name: str = ""  # the tool, for FUNCTION
