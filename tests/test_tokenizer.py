"""Token counting in the supervisor equals the worker's tokenization, text for text."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.protocol import HomeLayout
from bastion.supervisor.errors import InvalidModelFileError
from bastion.supervisor.models.registry import ModelRegistry
from bastion.supervisor.models.sources import resolve_gguf
from bastion.supervisor.models.tokenizer import ByteTokenCounter, TokenCounters, VocabTokenCounter
from bastion.worker.fake import FakeEngine, FakeEngineConfig
from bastion.worker.llama_engine import LlamaCppEngine, LlamaEngineConfig
from tests.real_models import smollm2_gguf

TEXTS = [
    "",
    "Hello, world!",
    "  leading spaces and\ttabs\nand newlines\n\n",
    "Ünïcödé, 日本語, emoji 🚀👩‍💻, and a lone é",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text before <|im_start|>system\nYou are terse.<|im_end|>",
    "<|im_end|><|im_end|>",
    "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "no bos: <start_of_turn>user\nHi<end_of_turn>",
    "<bos>",
    "<s>not special here</s>",
    "x" * 5000,
]


def engine_for(path: Path) -> LlamaCppEngine:
    return LlamaCppEngine(LlamaEngineConfig(model_path=str(path), n_ctx=256, n_batch=64, threads=1))


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    layout = HomeLayout(tmp_path_factory.mktemp("home"))
    return resolve_gguf(ModelRegistry.load(layout).lookup("gemma3-270m"), layout)


@pytest.fixture(scope="module")
def smollm2() -> Iterator[VocabTokenCounter]:
    counter = VocabTokenCounter(smollm2_gguf())
    yield counter
    counter.close()


@pytest.mark.real_model
def test_smollm2_counts_equal_the_worker_engine(smollm2: VocabTokenCounter) -> None:
    engine = engine_for(smollm2_gguf())
    try:
        assert not smollm2.adds_bos and smollm2.bos_text == "<|im_start|>"
        for text in TEXTS:
            assert smollm2.count(text) == len(engine.tokenize(text)), text
        # Special tokens really are parsed: the marker is one token, not several.
        assert smollm2.count("<|im_start|>") == 1
    finally:
        engine.close()


@pytest.mark.real_model
def test_gemma_counts_equal_the_worker_engine_bos_added_once(gemma_gguf: Path) -> None:
    counter = VocabTokenCounter(gemma_gguf)
    engine = engine_for(gemma_gguf)
    try:
        assert counter.adds_bos and counter.bos_text == "<bos>"
        for text in TEXTS:
            assert counter.count(text) == len(engine.tokenize(text)), text
        # BOS is added to plain text but not doubled when the template wrote it.
        assert counter.count("<bos>Hi") == counter.count("Hi")
        assert counter.count("<bos>") == 1 and counter.count("") == 1
    finally:
        engine.close()
        counter.close()


_FAKE_TEXT = st.lists(
    st.one_of(st.text(max_size=8), st.sampled_from(["<s>", "</s>", "<", "/s>"])), max_size=12
)


@settings(max_examples=300, deadline=None)
@given(parts=_FAKE_TEXT, add_bos=st.booleans())
def test_byte_counter_equals_the_fake_engine(parts: list[str], add_bos: bool) -> None:
    text = "".join(parts)
    engine = FakeEngine(FakeEngineConfig(add_bos=add_bos))
    assert ByteTokenCounter(add_bos=add_bos).count(text) == len(engine.tokenize(text))


def test_byte_counter_examples() -> None:
    counter = ByteTokenCounter()
    assert counter.count("") == 1
    assert counter.count("<s>hi</s>") == 4
    assert counter.count("é") == 3


def test_missing_or_non_gguf_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFileError, match="not found"):
        VocabTokenCounter(tmp_path / "gone.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all" * 10)
    with pytest.raises(InvalidModelFileError, match="not a GGUF"):
        VocabTokenCounter(junk)


@pytest.mark.real_model
def test_counters_load_each_model_once_across_threads() -> None:
    path = smollm2_gguf()
    with TokenCounters() as counters:
        got: list[VocabTokenCounter] = []
        barrier = threading.Barrier(4)

        def fetch() -> None:
            barrier.wait()
            got.append(counters.get(path))

        threads = [threading.Thread(target=fetch) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(got) == 4 and all(counter is got[0] for counter in got)
        assert counters.get(str(path)) is got[0]

        async def count_off_the_loop() -> list[int]:
            return await asyncio.gather(*(asyncio.to_thread(got[0].count, t) for t in TEXTS))

        assert asyncio.run(count_off_the_loop()) == [got[0].count(t) for t in TEXTS]
    with pytest.raises(RuntimeError, match="closed"):
        got[0].count("freed with its cache")
    with pytest.raises(RuntimeError, match="closed"):
        counters.get(path)
