"""Reasoning split from the answer, whole or streamed, in every family's markers.

Cases come from llama.cpp's tests/test-chat.cpp (LC): the message_assist_thoughts*
expectations of test_template_output_parsers, by template block.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.supervisor.tools.reasoning import (
    Piece,
    PieceKind,
    ReasoningFormat,
    ReasoningSplit,
    ReasoningSplitter,
    guess_reasoning_format,
    join_pieces,
    prompt_opens_reasoning,
    split_reasoning,
)
from tests.call_samples import ARG1, calls_of, parse

R = ReasoningFormat
LC = "llama.cpp tests/test-chat.cpp"
ANSWER = "Hello, world!\nWhat's up?"
HARMONY_CALL = '<|channel|>commentary to=functions.special_function<|message|>{"arg1": 1}<|call|>'

# (spec, source, reply, format, starts inside, reasoning, content)
SPLITS: list[tuple[str, str, str, ReasoningFormat, bool, str, str]] = [
    ("splits_a_think_block_from_the_answer", f"{LC} llama-cpp-deepseek-r1",
     f"<think>I'm\nthinking</think>{ANSWER}", R.THINK_TAGS, False, "I'm\nthinking", ANSWER),
    ("reads_a_reply_that_starts_inside_an_opened_think", f"{LC} DeepSeek-R1-Distill, thinking forced open",
     f"I'm\nthinking</think>{ANSWER}", R.THINK_TAGS, True, "I'm\nthinking", ANSWER),
    ("keeps_a_stray_closer_as_content_when_the_prompt_opened_nothing",
     f"{LC} message_assist_thoughts_unopened",
     f"I'm\nthinking</think>{ANSWER}", R.THINK_TAGS, False, "", f"I'm\nthinking</think>{ANSWER}"),
    ("keeps_reasoning_left_open_at_the_end_as_reasoning", f"{LC} Hermes-2-Pro, <think><tool_call>nah uhg",
     "<think><tool_call>nah uhg</tool_call>", R.THINK_TAGS, False, "<tool_call>nah uhg</tool_call>", ""),
    ("gathers_interleaved_think_blocks", f"{LC} GLM-4.6, interleaved thinking",
     "\n<think>I'm\nthinking</think>Hello, world!\n<think>Thinking2</think>What's up?", R.THINK_TAGS, False,
     "I'm\nthinkingThinking2", "\nHello, world!\nWhat's up?"),
    ("splits_magistral_think_brackets", f"{LC} message_assist_thoughts_unparsed_magistral",
     "[THINK]raisonnement[/THINK]Réponse", R.MISTRAL, False, "raisonnement", "Réponse"),
    ("splits_seed_oss_think_tags", f"{LC} ByteDance-Seed-OSS",
     "<seed:think>I'm thinking about the answer</seed:think>Hello, world!", R.SEED, False,
     "I'm thinking about the answer", "Hello, world!"),
    ("splits_command_r7b_thinking", f"{LC} CohereForAI-c4ai-command-r7b-12-2024",
     f"<|START_THINKING|>I'm\nthinking<|END_THINKING|><|START_RESPONSE|>{ANSWER}<|END_RESPONSE|>",
     R.COMMAND_R, False, "I'm\nthinking", f"<|START_RESPONSE|>{ANSWER}<|END_RESPONSE|>"),
    ("splits_apertus_inner_thoughts", f"{LC} Apertus-8B-Instruct",
     f"<|inner_prefix|>I'm\nthinking<|inner_suffix|>{ANSWER}", R.APERTUS, False, "I'm\nthinking", ANSWER),
    ("splits_harmony_analysis_from_final", f"{LC} openai-gpt-oss-120b",
     f"<|channel|>analysis<|message|>I'm\nthinking<|end|><|start|>assistant<|channel|>final<|message|>"
     f"{ANSWER}", R.HARMONY, False, "I'm\nthinking", ANSWER),
    ("keeps_an_unfinished_harmony_analysis_as_reasoning", f"{LC} openai-gpt-oss-120b, partial",
     "<|channel|>analysis<|message|>I'm\nthink", R.HARMONY, False, "I'm\nthink", ""),
    ("rewrites_harmony_calls_for_the_call_parser", f"{LC} openai-gpt-oss-120b, commentary then call",
     f"<|channel|>analysis<|message|>I'm\nthinking<|end|><|start|>assistant<|channel|>commentary<|message|>"
     f"{ANSWER}<|end|><|start|>assistant<|channel|>commentary to=functions.special_function "
     '<|constrain|>json<|message|>{"arg1": 1}<|call|>',
     R.HARMONY, False, "I'm\nthinking", ANSWER + HARMONY_CALL),
    ("treats_a_harmony_call_on_the_analysis_channel_as_a_call", f"{LC} openai-gpt-oss-120b, analysis to=",
     "<|channel|>analysis<|message|>I'm\nthinking<|end|><|start|>assistant<|channel|>analysis "
     'to=functions.special_function <|constrain|>json<|message|>{"arg1": 1}', R.HARMONY, False,
     "I'm\nthinking", '<|channel|>commentary to=functions.special_function<|message|>{"arg1": 1}'),
    ("reads_text_without_harmony_tokens_as_content", "a harmony model that answered plainly",
     "Just an answer.", R.HARMONY, False, "", "Just an answer."),
    ("reads_a_channel_token_with_no_message_after_it_as_text", "a header runs at most MAX_HEADER characters",
     "<|channel|>" + "x" * 300, R.HARMONY, False, "", "<|channel|>" + "x" * 300),
    ("leaves_everything_to_content_without_a_format", "ReasoningFormat.NONE",
     "<think>x</think>y", R.NONE, False, "", "<think>x</think>y"),
]  # fmt: skip


@pytest.mark.parametrize(("reply", "fmt", "inside", "reasoning", "content"), [case[2:] for case in SPLITS],
                         ids=[case[0] for case in SPLITS])  # fmt: skip
def test_splits_reasoning_from_content(
    reply: str, fmt: ReasoningFormat, inside: bool, reasoning: str, content: str
) -> None:
    assert split_reasoning(reply, fmt, starts_inside=inside) == ReasoningSplit(
        reasoning=reasoning, content=content
    )


def test_the_content_of_a_forced_open_think_reply_is_what_the_call_parser_reads() -> None:
    # LC NousResearch-Hermes-2-Pro: QwQ-32B's template adds a trailing <think> to the prompt.
    reply = (
        'I\'m\nthinking</think>\n<tool_call>{"name": "special_function", "arguments": {"arg1": 1}}'
        "</tool_call>"
    )
    split = split_reasoning(reply, R.THINK_TAGS, starts_inside=True)
    assert split.reasoning == "I'm\nthinking" and calls_of(parse(split.content)) == [ARG1]


def test_a_call_quoted_in_harmony_analysis_is_not_parsed() -> None:
    reply = ('<|channel|>analysis<|message|>Maybe <tool_call>'
             '{"name": "special_function", "arguments": {"arg1": 1}}'
             "</tool_call>? No.<|end|><|start|>assistant<|channel|>final<|message|>"
             "Hi.<|return|>")  # fmt: skip
    split = split_reasoning(reply, R.HARMONY)
    assert split.content == "Hi." and parse(split.content).calls == ()


def test_a_harmony_split_hands_its_calls_to_the_parser() -> None:
    [reply] = [case[2] for case in SPLITS if case[0] == "rewrites_harmony_calls_for_the_call_parser"]
    split = split_reasoning(reply, R.HARMONY)
    outcome = parse(split.content)
    assert calls_of(outcome) == [ARG1] and outcome.prose == ANSWER


def test_streaming_holds_back_only_what_could_still_be_a_marker() -> None:
    splitter = ReasoningSplitter(R.THINK_TAGS)
    assert splitter.feed("Hello <thi") == [Piece(PieceKind.CONTENT, "Hello ")]
    assert splitter.feed("nk>hmm</th") == [Piece(PieceKind.REASONING, "hmm")]
    assert splitter.feed("ink> a <b") == [Piece(PieceKind.CONTENT, " a <b")]
    assert splitter.feed(" <") == [Piece(PieceKind.CONTENT, " ")]
    assert splitter.flush() == [Piece(PieceKind.CONTENT, "<")]


_MARKER_BITS = ["<think>", "</think>", "<thi", "nk>", "</", "[THINK]", "[/THINK]", "[TH", "<seed:think>",
                "</seed:think>", "<|channel|>", "analysis", "final", "commentary",
                " to=functions.special_function", "<|message|>", "<|end|>", "<|start|>", "assistant",
                "<|call|>", "<|return|>", "<|constrain|>json", "<|", "|>", "<", ">", "\n", " ", "a",
                '{"arg1": 1}', "<|START_THINKING|>", "<|END_THINKING|>",
                "a long run of plain text, longer than any harmony header may be. " * 5]  # fmt: skip
_REPLIES = st.lists(st.sampled_from(_MARKER_BITS) | st.text(max_size=4), max_size=30).map("".join)


@settings(max_examples=400, deadline=None)
@given(_REPLIES, st.sampled_from(list(ReasoningFormat)), st.booleans(), st.data())
def test_any_cut_of_a_reply_streams_to_its_one_shot_split(
    reply: str, fmt: ReasoningFormat, inside: bool, data: st.DataObject
) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(reply)), max_size=12)))
    deltas = [reply[start:end] for start, end in zip([0, *cuts], [*cuts, len(reply)])]
    splitter = ReasoningSplitter(fmt, starts_inside=inside)
    pieces = [piece for delta in deltas for piece in splitter.feed(delta)] + splitter.flush()
    assert all(piece.text for piece in pieces)
    assert join_pieces(pieces) == split_reasoning(reply, fmt, starts_inside=inside)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.sampled_from([R.THINK_TAGS, R.MISTRAL, R.SEED]))
def test_pair_formats_lose_no_text_but_their_markers(reply: str, fmt: ReasoningFormat) -> None:
    split = split_reasoning(reply, fmt)
    assert len(split.reasoning) + len(split.content) <= len(reply)
    if "<" not in reply and "[" not in reply:
        assert split == ReasoningSplit(reasoning="", content=reply)


@pytest.mark.parametrize(
    ("prompt", "fmt", "opens"),
    [
        ("<|im_start|>assistant\n<think>\n", None, True),  # LC Qwen-QwQ-32B adds a trailing <think>
        ("<｜Assistant｜><think>\n", R.THINK_TAGS, True),  # LC DeepSeek-R1: template of 20250209
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", None, False),  # Qwen3 with thinking turned off
        ("[/INST][THINK]", R.MISTRAL, True),
        ("[/INST][THINK]", R.THINK_TAGS, False),
        ("<|start|>assistant<|channel|>analysis<|message|>", R.HARMONY, True),
        ("<|start|>assistant", R.HARMONY, False),
        ("<|im_start|>assistant\n", None, False),
    ],
    ids=["qwq_prompt_opens_a_think", "deepseek_r1_prompt_opens_a_think", "a_closed_empty_think_opens_nothing",
         "magistral_prompt_opens_a_think_bracket", "a_think_bracket_is_not_a_think_tag",
         "harmony_prompt_opening_analysis", "harmony_prompt_before_any_channel", "plain_generation_prompt"],
)  # fmt: skip
def test_tells_from_the_prompt_tail_whether_the_reply_starts_inside_reasoning(
    prompt: str, fmt: ReasoningFormat | None, opens: bool
) -> None:
    assert prompt_opens_reasoning(prompt, fmt) is opens


@pytest.mark.parametrize(
    ("template", "fmt"),
    [("{{ '<|start|>assistant<|channel|>final<|message|>' }}", R.HARMONY),
     ("[THINK]{{ thinking }}[/THINK]", R.MISTRAL), ("<seed:think>", R.SEED),
     ("<|START_THINKING|>", R.COMMAND_R),
     ("<|inner_prefix|>", R.APERTUS), ("{{ '<|im_start|>assistant\\n<think>\\n' }}", R.THINK_TAGS),
     ("{{ messages }}", R.THINK_TAGS)],
)  # fmt: skip
def test_guesses_the_reasoning_format_from_a_template(template: str, fmt: ReasoningFormat) -> None:
    assert guess_reasoning_format(template) is fmt


@pytest.mark.parametrize("fmt", list(ReasoningFormat))
def test_a_hostile_reply_streams_in_bounded_time(fmt: ReasoningFormat) -> None:
    reply = "<thi<think></th[THINK]<|channel|><|channel|>analysis<|message|>x<|en" * 2_000
    started = time.perf_counter()
    split_reasoning(reply, fmt)
    splitter = ReasoningSplitter(fmt)
    for char in reply[:30_000]:
        splitter.feed(char)
    splitter.flush()
    assert time.perf_counter() - started < 5.0  # linear: well under a second
