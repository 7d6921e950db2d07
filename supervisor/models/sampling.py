"""Which sampler settings a model's runs use when the client leaves them unset.

In order, per setting (temperature, top_p, top_k, min_p, repeat_penalty):

    flags      what the request gave (a user's flag always wins)
    gguf       the model file's own recommendation: `general.sampling.temp`,
               `.top_p`, `.top_k`, `.min_p`, `.penalty_repeat` (llama.cpp's
               converters write these from the model's generation config)
    family     the model family's published defaults, from its model card
               or generation config (the table below), matched by the GGUF's
               `general.basename`/`general.name` or its architecture
    bastion    SamplingParams' own defaults

`resolve` returns the settings and a short account of where they came from,
which `run_start` carries. It reads metadata the supervisor already has
(gguf_metadata.py); it loads nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import msgspec

from bastion.protocol import SamplingParams
from bastion.protocol.control import SamplingRequest

_SETTINGS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")
_GGUF_KEYS = {
    "temperature": "general.sampling.temp",
    "top_p": "general.sampling.top_p",
    "top_k": "general.sampling.top_k",
    "min_p": "general.sampling.min_p",
    "repeat_penalty": "general.sampling.penalty_repeat",
}


class Family(msgspec.Struct, frozen=True):
    name: str
    pattern: str  # matched against "basename name architecture", case-insensitively
    settings: dict[str, float]
    source: str


# Each family's recommendation, with where it is published. The first match wins, so a
# distill comes before the base family it names ("DeepSeek R1 Distill Qwen 7B" is an R1).
FAMILIES = (
    Family("deepseek-r1", r"deepseek.?r1", {"temperature": 0.6, "top_p": 0.95},
           "DeepSeek-R1 model card usage recommendations"),
    Family("smollm2", r"smollm2", {"temperature": 0.2, "top_p": 0.9},
           "HuggingFaceTB/SmolLM2 model cards (generate(temperature=0.2, top_p=0.9))"),
    Family("qwen3", r"qwen3", {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0},
           "Qwen3 model cards, thinking mode"),
    Family("qwen2.5", r"qwen2\.?5|\bqwen2\b", {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repeat_penalty": 1.05},
           "Qwen2.5 generation_config.json"),
    Family("gemma3", r"gemma.?3", {"temperature": 1.0, "top_k": 64, "top_p": 0.95, "min_p": 0.0},
           "Gemma 3 generation_config.json"),
    Family("llama3", r"llama.?3", {"temperature": 0.6, "top_p": 0.9},
           "Meta Llama 3 generation_config.json"),
    Family("gpt-oss", r"gpt.?oss", {"temperature": 1.0, "top_p": 1.0},
           "OpenAI gpt-oss model card"),
)  # fmt: skip


class SamplingDefaults(msgspec.Struct, frozen=True):
    """A model's recommended settings, and where they come from."""

    settings: dict[str, float] = {}
    source: str = "bastion"


def recommended(metadata: Mapping[str, Any]) -> SamplingDefaults:
    """The model's own recommendation (GGUF metadata), else its family's, else none."""
    in_file = {name: float(metadata[key]) for name, key in _GGUF_KEYS.items()
               if isinstance(metadata.get(key), int | float)}  # fmt: skip
    if in_file:
        return SamplingDefaults(in_file, "gguf general.sampling")
    identity = " ".join(str(metadata.get(key, "")) for key in ("general.basename", "general.name",
                                                               "general.architecture")).lower()
    for family in FAMILIES:
        if re.search(family.pattern, identity):
            return SamplingDefaults(family.settings, f"family {family.name} ({family.source})")
    return SamplingDefaults()


def resolve(request: SamplingRequest, defaults: SamplingDefaults) -> tuple[SamplingParams, str]:
    """The settings a run uses, and where the ones the request left unset came from."""
    base = SamplingParams()
    chosen: dict[str, Any] = {}
    given = []
    for name in _SETTINGS:
        value = getattr(request, name)
        if value is not None:
            chosen[name] = value
            given.append(name)
        else:
            chosen[name] = defaults.settings.get(name, getattr(base, name))
    chosen["top_k"] = int(chosen["top_k"])
    params = SamplingParams(max_tokens=request.max_tokens, seed=request.seed, ignore_eos=request.ignore_eos,
                            stop=request.stop, loop_guard=request.loop_guard, logprobs=request.logprobs, **chosen)
    if len(given) == len(_SETTINGS):
        return params, "flags"
    source = defaults.source if defaults.settings else "bastion"
    return params, f"{source}; flags: {', '.join(given)}" if given else source
