"""The agent harness end to end: the real CLI, supervisor and worker processes.

The loop's rules (stop reasons, repairs, ceilings, event order, retries) are
tested in-process in test_harness.py; here one scripted run shows the same
loop through the real processes and protocol, and the real SmolLM2 model
shows it works with a model that decides for itself: prompts, templates,
sessions across a restart, chat, cancel, the context budget over twenty turns.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.e2e_support import Bastion, events_of, start_streaming, write_config
from tests.real_models import smollm2_gguf
from tests.scripted import script
from tests.scripted import tool_call as call

pytestmark = pytest.mark.e2e


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
    # A tool nobody has is a usage error, named with the ones there are.
    unknown = bastion("run", "hi", "--model", model, "--tools", "calculator,teleport")
    assert unknown.returncode == 2 and "teleport" in unknown.stderr and "calculator" in unknown.stderr


@pytest.mark.real_model
def test_show_prompt_prints_the_exact_prompt_and_generates_nothing(shared_bastion: Bastion) -> None:
    done = shared_bastion("run", "What is 2+2?", "--system", "Be brief.", "--show-prompt")
    assert done.returncode == 0
    assert done.stdout.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?")
    assert done.stdout.endswith("<|im_start|>assistant\n")
    code, lines = shared_bastion.json("run", "What is 2+2?", "--show-prompt")
    assert code == 0 and not events_of(lines, "token") and not events_of(lines, "generation_stats")
    prompt = events_of(lines, "prompt")[0]
    assert prompt["tokens"] > 5 and prompt["template"] == "gguf (chatml family)"


@pytest.mark.real_model
def test_template_override_per_run(shared_bastion: Bastion) -> None:
    code, lines = shared_bastion.json("run", "Hi", "--template", "llama3", "--show-prompt")
    assert code == 0
    prompt = events_of(lines, "prompt")[0]
    assert prompt["template"].startswith("override:llama3")
    assert "<|start_header_id|>user<|end_header_id|>" in prompt["prompt"]
    bad = shared_bastion("run", "Hi", "--template", "klingon", "--show-prompt")
    assert bad.returncode == 2 and "chatml" in bad.stderr


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

    from tests.e2e_support import BASTION

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


@pytest.mark.real_model
def test_cancel_keeps_the_partial_reply_marked_interrupted(shared_bastion: Bastion) -> None:
    process, events, first_token, reader = start_streaming(
        shared_bastion, "Write a long story about a cat.", "--session", "cut", "--max-tokens", "2000", "--ignore-eos")
    assert first_token.wait(120)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    reader.join(10)
    _, (detail,) = shared_bastion.json("sessions", "show", "cut")
    reply = detail["messages"][-1]
    assert reply["role"] == "assistant" and reply["interrupted"] is True and reply["content"]
    # The next turn continues the session normally.
    code, lines = shared_bastion.json("run", "Shorter, please.", "--session", "cut", "--max-tokens", "8")
    assert code == 0 and lines[-1]["stop_reason"] in ("stop", "length")


@pytest.mark.real_model
def test_the_real_model_is_offered_the_calculator_and_the_loop_terminates(shared_bastion: Bastion) -> None:
    code, lines = shared_bastion.json(
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


def small_context_models(bastion: Bastion) -> None:
    """SmolLM2 registered with small contexts (`small-ctx-1024`, `small-ctx-256`)."""
    write_config(bastion, "".join(f'[models.small-ctx-{n}]\npath = "{smollm2_gguf()}"\nn_ctx = {n}\n\n'
                                  for n in (1024, 256)))


@pytest.mark.real_model
def test_a_twenty_turn_chat_stays_in_budget_and_keeps_the_cache_warm(shared_bastion: Bastion) -> None:
    small_context_models(shared_bastion)
    model = "small-ctx-1024"
    topics = ["rivers", "mountains", "bread", "owls", "trains", "tea", "maps", "bees", "clocks", "boats"]
    rows = []
    for turn in range(20):
        question = f"Tell me one short fact about {topics[turn % len(topics)]}."
        code, lines = shared_bastion.json("run", question, "--session", "long", "--model", model, "--max-tokens", "48",
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


@pytest.mark.real_model
def test_a_prompt_that_cannot_fit_is_a_clear_error(shared_bastion: Bastion) -> None:
    small_context_models(shared_bastion)
    model = "small-ctx-256"
    code, lines = shared_bastion.json("run", "tell me " * 400, "--model", model, "--max-tokens", "16")
    assert code == 1
    error = events_of(lines, "error")[0]
    assert error["code"] == "context_overflow" and "n_ctx" in error["message"]
