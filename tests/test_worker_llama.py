"""LlamaCppEngine in-process with the real SmolLM2-135M GGUF, driven through WorkerCore."""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Iterator

import msgspec
import pytest

from bastion.protocol import GenerationStats, SamplingParams, StopReason, TokenDelta, TokenLogprobs
from bastion.protocol.worker_wire import FromWorker, Generate, GenerationFinished
from bastion.worker.core import CoreConfig, WorkerCore
from bastion.worker.llama_engine import LlamaCppEngine, LlamaEngineConfig
from tests.real_models import smollm2_gguf

pytestmark = pytest.mark.real_model

PROMPT = "<|im_start|>user\nWrite one sentence about the sea.<|im_end|>\n<|im_start|>assistant\n"
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)




@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine(LlamaEngineConfig(model_path=str(smollm2_gguf()), n_ctx=1024, threads=2))
    yield engine
    engine.close()


@pytest.fixture
def core(engine: LlamaCppEngine) -> WorkerCore:
    engine.sequences()[0].reset()
    return WorkerCore(engine, CoreConfig(delta_interval_s=0.0))  # a TokenDelta per token


def generate(
    core: WorkerCore, prompt: str, sampling: SamplingParams = GREEDY, cancel_after: int | None = None
) -> tuple[str, GenerationStats, GenerationFinished]:
    out: list[FromWorker] = []

    def cancelled() -> bool:
        return cancel_after is not None and sum(isinstance(m, TokenDelta) for m in out) >= cancel_after

    request = Generate(request_id="r", session_id="s", prompt=prompt, sampling=sampling)
    core.generate(request, out.append, cancelled)
    stats, finished = out[-2], out[-1]
    assert isinstance(stats, GenerationStats) and isinstance(finished, GenerationFinished), out[-2:]
    return "".join(m.text for m in out if isinstance(m, TokenDelta)), stats, finished


def test_describe_reads_the_gguf_metadata(engine: LlamaCppEngine) -> None:
    info = engine.describe()
    assert info.architecture == "llama"
    assert info.n_ctx == 1024 and info.n_ctx_train >= 2048
    assert info.n_vocab == 49152 and info.n_params > 100_000_000
    assert "<|im_start|>" in info.chat_template
    assert info.bos_token == "<|im_start|>" and info.eos_token == "<|im_end|>"
    assert info.threads == 2


def test_tokenize_parses_special_tokens_without_doubling_bos(engine: LlamaCppEngine) -> None:
    tokens = engine.tokenize("<|im_start|>user\nhi<|im_end|>")
    assert tokens[0] == engine.tokenize("<|im_start|>")[0]
    assert tokens.count(tokens[0]) == 1
    assert engine.is_end_of_generation(tokens[-1])
    assert b"".join(engine.token_bytes(t) for t in tokens[1:-1]) == b"user\nhi"


def test_greedy_generation_is_deterministic_cached_or_not(core: WorkerCore) -> None:
    # With this prompt, logits from a one-token batch pick another first word.
    prompt = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"
    )
    first, stats1, _ = generate(core, prompt)
    second, stats2, _ = generate(core, prompt)
    assert first.strip()
    assert stats1.cached_tokens == 0 and stats2.cached_tokens > 0
    assert second == first


def test_extending_the_prompt_reuses_the_cache(core: WorkerCore) -> None:
    reply, first, _ = generate(core, PROMPT)
    turn = "<|im_end|>\n<|im_start|>user\nAnd one about the sky.<|im_end|>\n<|im_start|>assistant\n"
    follow_up = PROMPT + reply + turn
    _, second, _ = generate(core, follow_up)
    assert second.cached_tokens >= first.prompt_tokens
    assert second.prompt_tokens > second.cached_tokens


def test_cancel_takes_effect_within_one_token(core: WorkerCore) -> None:
    sampling = SamplingParams(temperature=0.7, seed=1, max_tokens=64)
    _, stats, finished = generate(core, PROMPT, sampling, cancel_after=3)
    assert finished.stop_reason is StopReason.CANCELLED
    assert stats.completion_tokens == 3


def test_eos_stops_generation(core: WorkerCore) -> None:
    _, stats, finished = generate(core, PROMPT, SamplingParams(temperature=0.0, max_tokens=400))
    assert finished.stop_reason is StopReason.STOP
    assert stats.completion_tokens < 400


def test_log_probabilities_describe_the_step_each_token_was_sampled_at(core: WorkerCore) -> None:
    """Greedy picks the most likely token, so a report read from the right logits has the chosen
    token first among the alternatives; asking for them changes nothing in the reply, and a prompt
    served from the cache gives the same figures as one evaluated afresh."""

    def run(sampling: SamplingParams) -> tuple[str, list[TokenLogprobs], int]:
        out: list[FromWorker] = []
        core.generate(Generate(request_id="r", session_id="s", prompt=PROMPT, sampling=sampling), out.append,
                      lambda: False)  # fmt: skip
        # Each token's report comes just before the text it produced.
        assert all(isinstance(after, TokenDelta) for report, after in itertools.pairwise(out)
                   if isinstance(report, TokenLogprobs))  # fmt: skip
        [stats] = [m for m in out if isinstance(m, GenerationStats)]
        text = "".join(m.text for m in out if isinstance(m, TokenDelta))
        return text, [m for m in out if isinstance(m, TokenLogprobs)], stats.completion_tokens

    plain, none, _ = run(GREEDY)
    text, reports, generated = run(msgspec.structs.replace(GREEDY, logprobs=5))
    assert text == plain and none == [] and len(reports) == generated > 5
    for report in reports:
        assert len(report.top) == 5 and report.top[0].token_bytes == report.chosen.token_bytes
        assert report.chosen.logprob == pytest.approx(report.top[0].logprob)
        assert all(a.logprob >= b.logprob for a, b in itertools.pairwise(report.top))
        assert report.top[-1].logprob < 0 and sum(math.exp(t.logprob) for t in report.top) <= 1.0 + 1e-6
    assert "".join(r.chosen.token for r in reports) == text
    _, cached, _ = run(msgspec.structs.replace(GREEDY, logprobs=5))  # the whole prompt is in the cache now
    assert [r.chosen.logprob for r in cached] == pytest.approx([r.chosen.logprob for r in reports], abs=1e-3)


def test_a_cancel_during_a_long_prefill_stops_inside_the_chunk_and_keeps_the_state_exact(
    core: WorkerCore, engine: LlamaCppEngine
) -> None:
    """llama.cpp checks the cancel between graph nodes while the worker prefills, so a cancel
    waits for no chunk to finish; the interrupted chunk leaves nothing in the cache."""
    facts = " ".join(f"Fact {i}: the number {i} is odd or even." for i in range(60))
    prompt = f"<|im_start|>user\n{facts}\nWhich fact is first?<|im_end|>\n<|im_start|>assistant\n"
    tokens = engine.tokenize(prompt)
    assert 3 * 256 < len(tokens) < 1000
    engine.sequences()[0].reset()
    started = time.perf_counter()
    engine.sequences()[0].evaluate(tokens[:256])
    chunk_s = time.perf_counter() - started  # one chunk's time here, now
    engine.sequences()[0].reset()

    cancel, fired = threading.Event(), []

    def fire() -> None:
        fired.append(time.perf_counter())
        cancel.set()

    out: list[FromWorker] = []
    timer = threading.Timer(1.5 * chunk_s, fire)  # inside the second chunk
    timer.start()
    try:
        core.generate(Generate(request_id="r", session_id="s", prompt=prompt, sampling=GREEDY), out.append,
                      cancel.is_set)  # fmt: skip
    finally:
        timer.cancel()
    stopped = time.perf_counter()
    assert isinstance(out[-1], GenerationFinished) and out[-1].stop_reason is StopReason.CANCELLED
    assert fired and stopped - fired[0] < chunk_s / 3, (stopped - fired[0], chunk_s)
    assert engine.sequences()[0].kv_tokens() in (256, 512) and engine.sequences()[0].kv_token_ids() == tokens[: engine.sequences()[0].kv_tokens()]
    resumed, stats, _ = generate(core, prompt)  # continues from what was kept, and answers as a fresh prefill
    assert 0 < stats.cached_tokens <= 512
    engine.sequences()[0].reset()
    assert resumed == generate(WorkerCore(engine), prompt)[0]
