"""Constrained decoding in the worker (worker/grammar.py, worker/llama_engine.py)
with the real SmolLM2: a forced call is a valid call from its first token, a
lazy grammar leaves an answer alone, the grammar is compiled once per tool set,
and a schema the grammar cannot express falls back to free text, saying why."""

from __future__ import annotations

import json
from collections.abc import Iterator

import msgspec
import pytest

from bastion.protocol import GenerationStats, SamplingParams, StopReason, TokenDelta
from bastion.protocol.common import GrammarUse
from bastion.protocol.worker_wire import CallGrammar, Generate, GenerationFinished
from bastion.supervisor.tools.call_schema import call_schema
from bastion.supervisor.tools.registry import ToolRegistry
from bastion.supervisor.tools.schema import validate
from bastion.worker.core import WorkerCore
from bastion.worker.grammar import GrammarError, call_gbnf, trigger_pattern
from bastion.worker.llama_engine import LlamaCppEngine, LlamaEngineConfig
from tests.real_models import smollm2_gguf

TOOLS = ToolRegistry.builtin().select(["calculator", "clock"])
FENCED = {"prefix": "```tool_call\n", "suffix": "\n```"}
PROMPT = ("<|im_start|>user\nWhat is 1234 * 5678? Use the calculator.<|im_end|>\n"
          "<|im_start|>assistant\n")  # fmt: skip


def test_the_grammar_is_the_prefix_a_call_and_the_suffix() -> None:
    gbnf = call_gbnf(CallGrammar(schema=call_schema(TOOLS), **FENCED))
    root = gbnf.splitlines()[0]
    assert root == 'root ::= "```tool_call\\n" call "\\n```"'
    assert '"\\"calculator\\""' in gbnf and '"\\"clock\\""' in gbnf


def test_a_trigger_pattern_escapes_the_trigger_and_captures_it() -> None:
    assert trigger_pattern("[TOOL_CALLS][") == r"[\s\S]*?(\[TOOL_CALLS\]\[)[\s\S]*"
    assert trigger_pattern('{"name"') == r'[\s\S]*?(\{"name")[\s\S]*'


def test_a_schema_the_converter_cannot_read_is_a_grammar_error() -> None:
    with pytest.raises(GrammarError):
        call_gbnf(CallGrammar(schema={"$ref": "#/definitions/nowhere"}))


@pytest.fixture(scope="module")
def core() -> Iterator[tuple[WorkerCore, LlamaCppEngine]]:
    engine = LlamaCppEngine(LlamaEngineConfig(model_path=str(smollm2_gguf()), n_ctx=1024, threads=2))
    yield WorkerCore(engine), engine
    engine.close()


def generate(core: WorkerCore, grammar: CallGrammar | None) -> tuple[str, GenerationStats, GenerationFinished]:
    events: list[object] = []
    request = Generate(request_id="g", session_id="s", prompt=PROMPT, grammar=grammar,
                       sampling=SamplingParams(temperature=0, max_tokens=80))
    core.generate(request, events.append, lambda: False)  # type: ignore[arg-type]
    text = "".join(e.text for e in events if isinstance(e, TokenDelta))
    (stats,) = [e for e in events if isinstance(e, GenerationStats)]
    (finished,) = [e for e in events if isinstance(e, GenerationFinished)]
    return text, stats, finished


@pytest.mark.real_model
def test_a_forced_call_is_a_valid_call_from_its_first_token(core) -> None:
    worker, _engine = core
    text, stats, finished = generate(worker, CallGrammar(schema=call_schema(TOOLS), **FENCED))
    assert stats.grammar is GrammarUse.FULL and stats.grammar_triggered and finished.stop_reason is StopReason.STOP
    assert text.startswith("```tool_call\n") and text.endswith("\n```")
    call = json.loads(text.removeprefix("```tool_call\n").removesuffix("\n```"))
    assert validate(call, call_schema(TOOLS)) == []


@pytest.mark.real_model
def test_a_lazy_grammar_leaves_an_answer_without_a_call_alone(core) -> None:
    worker, _engine = core
    free, _stats, _ = generate(worker, None)
    lazy, stats, _ = generate(worker, CallGrammar(schema=call_schema(TOOLS), lazy=True, **FENCED))
    assert "```tool_call" not in free  # this model answers this prompt in prose when nothing forces a call
    assert lazy == free and stats.grammar is GrammarUse.LAZY and not stats.grammar_triggered


@pytest.mark.real_model
def test_a_tool_set_is_compiled_once_and_each_generation_starts_fresh(core) -> None:
    worker, engine = core
    grammar = CallGrammar(schema=call_schema(TOOLS[:1]), **FENCED)
    compiled = engine.grammars_compiled
    first, _, _ = generate(worker, grammar)
    second, _, _ = generate(worker, msgspec.structs.replace(grammar))
    assert first == second  # greedy, and the grammar's state did not carry over
    assert engine.grammars_compiled == compiled + 1


@pytest.mark.real_model
def test_an_inexpressible_schema_falls_back_to_free_text_and_says_why(core) -> None:
    worker, _engine = core
    text, stats, finished = generate(worker, CallGrammar(schema={"$ref": "#/definitions/nowhere"}, **FENCED))
    assert stats.grammar is GrammarUse.FAILED and "cannot be turned into a grammar" in stats.grammar_note
    assert text and finished.stop_reason is StopReason.STOP
