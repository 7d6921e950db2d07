"""KV snapshots and context shift through the real CLI, supervisor and worker
with SmolLM2: a session switch restores from RAM, a killed worker's successor
and a restarted supervisor's worker restore from disk, and pruned turns are
shifted out of the cache while what it holds stays exactly a fresh render."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import llama_cpp
import pytest

from bastion.worker.run_report import token_digest
from tests.e2e_support import Bastion, events_of
from tests.real_models import smollm2_gguf
from tests.waiting import wait_until

pytestmark = pytest.mark.real_model

GREEDY = ("--temperature", "0", "--max-tokens", "24")


def turn(bastion: Bastion, session: str, prompt: str, *extra: str) -> dict:
    code, lines = bastion.json("run", "--session", session, *GREEDY, *extra, prompt)
    assert code == 0, lines
    (stats,) = events_of(lines, "generation_stats")
    return stats


def wait_for_snapshot_files(home: Path, count: int, timeout: float = 60) -> None:
    wait_until(lambda: len(list((home / "kv").rglob("*.kv"))) >= count, timeout=timeout,
               what=f"{count} KV snapshots under {home / 'kv'}")


def worker_pid(bastion: Bastion) -> int:
    (model,) = bastion.models().values()
    return model.pid


def test_switch_restores_from_ram_and_a_killed_worker_resumes_from_disk(bastion: Bastion) -> None:
    turn(bastion, "alpha", "Name three colours of the rainbow.")
    turn(bastion, "beta", "What is the boiling point of water in Celsius?")
    back = turn(bastion, "alpha", "Which one do you like best?")
    assert back["cache_source"] == "ram" and back["cached_tokens"] > back["prompt_tokens"] // 2
    wait_for_snapshot_files(bastion.home, 2)
    # `ps` reports what the worker's last heartbeat (one a second) said.
    model = bastion.wait_for_model("smollm2-135m", lambda m: m.snapshots_ram == 2, timeout=30)
    assert model.snapshot_ram_bytes > 1_000_000

    os.kill(worker_pid(bastion), signal.SIGKILL)
    resumed = turn(bastion, "alpha", "And which one is the least liked?")
    assert resumed["cache_source"] == "disk"
    assert resumed["cached_tokens"] >= back["prompt_tokens"]

    # An unloaded model (by hand, or by keep_alive) comes back with its sessions on disk.
    assert bastion("unload", "smollm2-135m").returncode == 0
    after_unload = turn(bastion, "alpha", "Name one more colour.")
    assert after_unload["cache_source"] == "disk" and after_unload["cached_tokens"] >= resumed["prompt_tokens"]

    # A supervisor that stopped cleanly left every session's last turn on disk too.
    assert bastion("down", timeout=60).returncode == 0
    after_restart = turn(bastion, "beta", "And at the top of a high mountain?")
    assert after_restart["cache_source"] == "disk" and after_restart["cached_tokens"] > 0


def test_a_corrupt_snapshot_is_discarded_with_a_warning_and_the_turn_still_answers(bastion: Bastion) -> None:
    turn(bastion, "gamma", "Name three colours of the rainbow.")
    wait_for_snapshot_files(bastion.home, 1)
    assert bastion("down", timeout=60).returncode == 0
    (snapshot,) = (bastion.home / "kv").rglob("*.kv")
    raw = bytearray(snapshot.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    snapshot.write_bytes(bytes(raw))
    done = bastion("run", "--session", "gamma", *GREEDY, "Which one do you like best?")
    assert done.returncode == 0 and done.stdout.strip()
    assert "warning: KV snapshot discarded" in done.stderr and "corrupt" in done.stderr


def vocab(path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def fresh_tokens(tokenizer: llama_cpp.Llama, prompt: str) -> list[int]:
    """The prompt tokenized as the worker does: special tokens parsed, no
    second BOS when the text already starts with it (SmolLM2 adds none)."""
    return tokenizer.tokenize(prompt.encode(), add_bos=False, special=True)


def test_pruned_turns_are_shifted_out_and_the_kv_matches_a_fresh_render(bastion: Bastion) -> None:
    bastion.home.mkdir(parents=True, exist_ok=True)
    (bastion.home / "config.toml").write_text("[models.smollm2-135m]\nn_ctx = 640\n")
    tokenizer = vocab(smollm2_gguf())
    question = "Please tell me one short fact about the number {i}, and why it matters to mathematicians."
    shifted = None
    for i in range(16):
        text = question.format(i=i)
        # What the supervisor will send: the same planning, nothing generated.
        code, shown = bastion.json("run", "--session", "long", *GREEDY, "--show-prompt", text)
        assert code == 0
        (prompt,) = events_of(shown, "prompt")
        stats = turn(bastion, "long", text)
        assert stats["kv_digest"] == token_digest(fresh_tokens(tokenizer, prompt["prompt"]))
        if stats["shifted_tokens"]:
            shifted = stats
            break
    assert shifted is not None, "the conversation never outgrew the context"
    # Only the new turn (and the last reply's end) was evaluated, not what followed the dropped turns.
    assert shifted["prompt_tokens"] - shifted["cached_tokens"] < 60
    assert shifted["cache_source"] == "live"
    listed = bastion("sessions", "show", "long")
    assert listed.returncode == 0
