"""The agent harness end to end: real supervisor, real worker processes.

Scripted models (`--model scripted:FILE`) replay canned replies through the
same worker process and protocol as a GGUF, so the loop's behaviour — tool
calls, repairs, ceilings, sessions — is tested deterministically; the real
SmolLM2 model then shows the same path works with a model that decides for
itself.
"""

from __future__ import annotations

import json
import signal
from itertools import count
from pathlib import Path

import pytest

from tests.conftest import Bastion, smollm2_gguf
from tests.test_cli_e2e import events_of, start_streaming

pytestmark = pytest.mark.model

_files = count(1)


def script(tmp_path: Path, *replies: str) -> str:
    """A scripted model of its own (one worker per file name), as a --model value."""
    path = tmp_path / f"script{next(_files)}.json"
    path.write_text(json.dumps(list(replies)))
    return f"scripted:{path}"


def call(name: str, **arguments: object) -> str:
    return f"```tool_call\n{json.dumps({'name': name, 'arguments': arguments})}\n```"


def test_a_tool_call_runs_and_its_result_reaches_the_model(bastion: Bastion, tmp_path: Path) -> None:
    model = script(tmp_path, "Let me compute.\n" + call("calculator", expression="6*7"), "It is 42.")
    code, lines = bastion.json("run", "What is 6*7?", "--model", model, "--tools", "calculator")
    assert code == 0
    kinds = [line["type"] for line in lines if line["type"] not in ("token", "load_progress")]
    assert kinds == [
        "run_start",
        "turn_start", "context_budget", "generation_stats",
        "tool_call", "tool_decision", "tool_start", "tool_output", "tool_end", "turn_end",
        "turn_start", "context_budget", "generation_stats", "turn_end",
        "run_end",
    ]  # fmt: skip
    parsed = events_of(lines, "tool_call")[0]
    assert parsed["name"] == "calculator" and json.loads(parsed["arguments"]) == {"expression": "6*7"}
    assert parsed["format"] == "fenced"
    assert events_of(lines, "tool_decision")[0]["decision"] == "allow"
    end = events_of(lines, "tool_end")[0]
    assert end["ok"] is True and end["content"] == "42" and end["call_id"] == parsed["call_id"]
    assert lines[-1]["stop_reason"] == "stop"
    # The second generation saw the tool result and reused the first one's prefix.
    second = events_of(lines, "generation_stats")[1]
    assert second["cached_tokens"] > 0.8 * events_of(lines, "generation_stats")[0]["prompt_tokens"]


def test_several_calls_in_one_reply_run_in_order(bastion: Bastion, tmp_path: Path) -> None:
    reply = call("clock", timezone="UTC") + "\nand\n" + call("calculator", expression="2**10")
    model = script(tmp_path, reply, "Done.")
    code, lines = bastion.json("run", "Time and 2^10?", "--model", model, "--tools", "clock,calculator")
    assert code == 0
    assert [e["name"] for e in events_of(lines, "tool_call")] == ["clock", "calculator"]
    assert len(events_of(lines, "tool_decision")) == 2
    ends = events_of(lines, "tool_end")
    assert [e["name"] for e in ends] == ["clock", "calculator"] and ends[1]["content"] == "1024"
    assert "UTC" in ends[0]["content"] or "+00:00" in ends[0]["content"]


def test_without_tools_a_reply_is_never_parsed(bastion: Bastion, tmp_path: Path) -> None:
    reply = call("calculator", expression="1+1")
    code, lines = bastion.json("run", "hi", "--model", script(tmp_path, reply))
    assert code == 0
    assert not events_of(lines, "tool_call")
    assert "".join(e["text"] for e in events_of(lines, "token")) == reply


def test_an_unknown_tool_is_fed_back_and_the_model_can_recover(bastion: Bastion, tmp_path: Path) -> None:
    model = script(tmp_path, call("weather", city="Oslo"), call("calculator", expression="3+4"), "Seven.")
    code, lines = bastion.json("run", "hi", "--model", model, "--tools", "calculator")
    assert code == 0 and lines[-1]["stop_reason"] == "stop"
    warning = events_of(lines, "warning")[0]
    assert warning["code"] == "tool_call_invalid" and "weather" in warning["message"]
    assert [e["name"] for e in events_of(lines, "tool_end")] == ["calculator"]
    # The repair hint went back to the model as a result: the session shows it.


def test_unusable_calls_end_the_run_after_a_bounded_number_of_repairs(bastion: Bastion, tmp_path: Path) -> None:
    broken = "```tool_call\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \n```"
    model = script(tmp_path, *[broken] * 6)
    code, lines = bastion.json("run", "hi", "--model", model, "--tools", "calculator", "--max-iterations", "8")
    assert code == 1
    assert lines[-1]["stop_reason"] == "repair_limit"
    assert len(events_of(lines, "turn_start")) == 3  # the first try and two repairs
    assert any("giving up" in w["message"] for w in events_of(lines, "warning"))


def test_the_iteration_ceiling_ends_the_run_with_a_warning(bastion: Bastion, tmp_path: Path) -> None:
    model = script(tmp_path, *[call("calculator", expression=f"{i}+1") for i in range(5)])
    code, lines = bastion.json("run", "loop", "--model", model, "--tools", "calculator", "--max-iterations", "3")
    assert code == 1
    assert lines[-1]["stop_reason"] == "max_iterations"
    assert len(events_of(lines, "turn_start")) == 3 and len(events_of(lines, "tool_end")) == 3
    assert events_of(lines, "warning")[-1]["code"] == "max_iterations"


def test_an_unknown_tool_name_on_the_command_line_is_a_usage_error(bastion: Bastion, tmp_path: Path) -> None:
    done = bastion("run", "hi", "--model", script(tmp_path, "x"), "--tools", "calculator,teleport")
    assert done.returncode == 2
    assert "teleport" in done.stderr and "calculator" in done.stderr


def test_show_prompt_prints_the_exact_prompt_and_generates_nothing(bastion: Bastion) -> None:
    done = bastion("run", "What is 2+2?", "--system", "Be brief.", "--show-prompt")
    assert done.returncode == 0
    assert done.stdout.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?")
    assert done.stdout.endswith("<|im_start|>assistant\n")
    code, lines = bastion.json("run", "What is 2+2?", "--show-prompt")
    assert code == 0 and not events_of(lines, "token") and not events_of(lines, "generation_stats")
    prompt = events_of(lines, "prompt")[0]
    assert prompt["tokens"] > 5 and prompt["template"] == "gguf (chatml family)"


def test_template_override_per_run(bastion: Bastion) -> None:
    code, lines = bastion.json("run", "Hi", "--template", "llama3", "--show-prompt")
    assert code == 0
    prompt = events_of(lines, "prompt")[0]
    assert prompt["template"].startswith("override:llama3")
    assert "<|start_header_id|>user<|end_header_id|>" in prompt["prompt"]
    bad = bastion("run", "Hi", "--template", "klingon", "--show-prompt")
    assert bad.returncode == 2 and "chatml" in bad.stderr


def test_a_session_keeps_its_prefix_byte_stable_turn_after_turn(bastion: Bastion, tmp_path: Path) -> None:
    replies = ["First answer.", "Second answer.", "Third answer."]
    model = script(tmp_path, *replies)
    prompts, stats = [], []
    for question in ("one?", "two?", "three?"):
        shown = bastion("run", question, "--session", "stable", "--model", model, "--show-prompt")
        assert shown.returncode == 0
        prompts.append(shown.stdout)
        code, lines = bastion.json("run", question, "--session", "stable", "--model", model)
        assert code == 0
        stats.append(events_of(lines, "generation_stats")[0])
    # Turn N's prompt is turn N-1's prompt, its reply, and the new message: nothing re-rendered.
    for earlier, reply, later in zip(prompts, replies, prompts[1:], strict=False):
        assert later.startswith(earlier + reply)
    # So the worker reuses all of it (the scripted engine counts one token per byte).
    for previous, current in zip(stats, stats[1:], strict=False):
        assert current["cached_tokens"] >= previous["prompt_tokens"] + previous["completion_tokens"] - 2
    # `sessions show --prompt` is the same text, up to the generation prompt, as the next turn will see.
    pending = bastion("sessions", "show", "stable", "--prompt").stdout
    assert pending.startswith(prompts[-1] + replies[-1])


def test_sessions_persist_across_a_supervisor_restart_and_can_be_forked(bastion: Bastion, tmp_path: Path) -> None:
    model = script(tmp_path, "Noted: blue.", "Forked reply.")
    assert bastion("run", "My favourite colour is blue.", "--session", "memo", "--model", model,
                   "--system", "Remember things.").returncode == 0
    assert bastion("down").returncode == 0
    # A new supervisor, the same session: the model comes from the session.
    code, lines = bastion.json("run", "What is my colour?", "--session", "memo")
    assert code == 0 and events_of(lines, "run_start")[0]["model"].startswith("scripted-")
    _, (detail,) = bastion.json("sessions", "show", "memo")
    roles = [m["role"] for m in detail["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert detail["messages"][1]["content"] == "My favourite colour is blue."
    # A scripted model replays from its first reply in each new worker process.
    assert detail["messages"][4]["content"] == "Noted: blue."
    assert bastion("sessions", "fork", "memo", "memo-2").returncode == 0
    assert bastion("run", "And now?", "--session", "memo-2").returncode == 0
    _, (listing,) = bastion.json("sessions", "list")
    counts = {s["name"]: s["messages"] for s in listing["sessions"]}
    assert counts == {"memo": 5, "memo-2": 7}
    assert bastion("sessions", "rm", "memo-2").returncode == 0
    missing = bastion("sessions", "show", "memo-2")
    assert missing.returncode == 2 and "memo-2" in missing.stderr


def test_chat_with_slash_commands_from_stdin(bastion: Bastion, tmp_path: Path) -> None:
    import subprocess

    from tests.conftest import BASTION

    first, second = script(tmp_path, "Hello there.", "Still here."), script(tmp_path, "Other model.")
    lines = ["hello", "/pin the code is 1234", "/model " + second.split(":", 1)[1], "/help", "again",
             "/clear", "/exit"]  # fmt: skip
    # /model takes a name or path; give the scripted one explicitly.
    lines[2] = "/model " + second
    done = subprocess.run([BASTION, "chat", "--session", "talk", "--model", first], input="\n".join(lines) + "\n",
                          env=bastion.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Hello there." in done.stdout and "Other model." in done.stdout
    assert "/pin" in done.stderr and "pinned" in done.stderr and "cleared" in done.stderr
    _, (detail,) = bastion.json("sessions", "show", "talk")
    # /clear dropped the conversation but kept the pinned note.
    assert [(m["content"], m["pinned"]) for m in detail["messages"]] == [("the code is 1234", True)]


def test_cancel_keeps_the_partial_reply_marked_interrupted(bastion: Bastion) -> None:
    process, events, first_token, reader = start_streaming(
        bastion, "Write a long story about a cat.", "--session", "cut", "--max-tokens", "2000", "--ignore-eos")
    assert first_token.wait(120)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    reader.join(10)
    _, (detail,) = bastion.json("sessions", "show", "cut")
    reply = detail["messages"][-1]
    assert reply["role"] == "assistant" and reply["interrupted"] is True and reply["content"]
    # The next turn continues the session normally.
    code, lines = bastion.json("run", "Shorter, please.", "--session", "cut", "--max-tokens", "8")
    assert code == 0 and lines[-1]["stop_reason"] in ("stop", "length")


def test_the_real_model_is_offered_the_calculator_and_the_loop_terminates(bastion: Bastion) -> None:
    code, lines = bastion.json(
        "run", "What is 12 times 7? Use the calculator tool.", "--tools", "calculator", "--max-iterations", "4",
        "--max-tokens", "96", "--temperature", "0",
    )  # fmt: skip
    assert lines[-1]["type"] == "run_end"
    assert lines[-1]["stop_reason"] in ("stop", "length", "max_iterations", "repair_limit")
    assert code == (0 if lines[-1]["stop_reason"] in ("stop", "length") else 1)
    turns = events_of(lines, "turn_start")
    assert 1 <= len(turns) <= 4 and len(events_of(lines, "turn_end")) == len(turns)
    assert len(events_of(lines, "generation_stats")) == len(turns)
    # Whatever the small model did, every call it made got a decision and an end.
    assert len(events_of(lines, "tool_call")) == len(events_of(lines, "tool_end"))


def small_context_model(bastion: Bastion, n_ctx: int) -> str:
    bastion.home.mkdir(parents=True, exist_ok=True)
    (bastion.home / "config.toml").write_text(
        f'[models.small-ctx]\npath = "{smollm2_gguf()}"\nn_ctx = {n_ctx}\n'
    )
    return "small-ctx"


def test_a_twenty_turn_chat_stays_in_budget_and_keeps_the_cache_warm(bastion: Bastion) -> None:
    model = small_context_model(bastion, 1024)
    topics = ["rivers", "mountains", "bread", "owls", "trains", "tea", "maps", "bees", "clocks", "boats"]
    rows = []
    for turn in range(20):
        question = f"Tell me one short fact about {topics[turn % len(topics)]}."
        code, lines = bastion.json("run", question, "--session", "long", "--model", model, "--max-tokens", "48",
                                   "--temperature", "0")
        assert code == 0, lines[-2:]
        budget = events_of(lines, "context_budget")[0]
        stats = events_of(lines, "generation_stats")[0]
        pruned = any(w["code"] == "context_pruned" for w in events_of(lines, "warning"))
        rows.append((budget["used_tokens"], budget["max_tokens"], stats["prompt_tokens"], stats["cached_tokens"],
                     pruned))
    for used, limit, prompt_tokens, _cached, _pruned in rows:
        assert used <= limit and prompt_tokens <= limit
    prunes = [i for i, row in enumerate(rows) if row[4]]
    assert prunes, "20 turns at n_ctx 1024 should outgrow the context at least once"
    # Chunked eviction: far fewer prunes than turns, so the prefix is stable in between.
    assert len(prunes) <= 6
    steady = [cached / prompt for i, (_u, _l, prompt, cached, _p) in enumerate(rows) if i > 0 and i not in prunes]
    steady.sort()
    assert steady[len(steady) // 2] >= 0.8, rows
    print("\nturn used/max prompt cached pruned")
    for i, (used, limit, prompt_tokens, cached, pruned) in enumerate(rows, 1):
        print(f"{i:4d} {used:4d}/{limit} {prompt_tokens:6d} {cached:6d} {'yes' if pruned else ''}")


def test_summarize_folds_the_oldest_turns_into_a_pinned_summary(bastion: Bastion, tmp_path: Path) -> None:
    long_reply = "word " * 40  # 200 tokens for the byte-counting scripted engine
    # Four turns fill the 900-token budget; before the fifth the loop asks for
    # a summary (the fifth reply), then answers with the sixth.
    replies = [long_reply] * 4 + ["SUMMARY: the user asked three things.", "ok"]
    path = tmp_path / "sum.json"
    path.write_text(json.dumps(replies))
    bastion.home.mkdir(parents=True, exist_ok=True)
    (bastion.home / "config.toml").write_text(
        f'[models.tiny]\nsource = {{ kind = "scripted", path = "{path}" }}\nn_ctx = 1100\n'
    )
    for question in ("first?", "second?", "third?", "fourth?", "fifth?"):
        code, lines = bastion.json("run", question, "--session", "fold", "--model", "tiny", "--context", "summarize",
                                   "--max-tokens", "200")
        assert code == 0, lines[-2:]
    assert "".join(e["text"] for e in events_of(lines, "token")) == "ok"  # the summary call was hidden
    _, (detail,) = bastion.json("sessions", "show", "fold")
    summaries = [m for m in detail["messages"] if m["content"].startswith("SUMMARY")]
    assert len(summaries) == 1 and summaries[0]["pinned"]
    shown = bastion("sessions", "show", "fold", "--prompt").stdout
    assert "SUMMARY: the user asked three things." in shown and "first?" not in shown


def test_a_prompt_that_cannot_fit_is_a_clear_error(bastion: Bastion) -> None:
    model = small_context_model(bastion, 256)
    code, lines = bastion.json("run", "tell me " * 400, "--model", model, "--max-tokens", "16")
    assert code == 1
    error = events_of(lines, "error")[0]
    assert error["code"] == "context_overflow" and "n_ctx" in error["message"]
