"""bench/gateway_vs_peers_report.py: the figures the README quotes come out of the raw rows as claimed.

The benchmark itself needs four servers and a quarter of an hour; its report is
pure arithmetic over the JSON it saved, so it is checked here on made-up rows
whose medians and ratios are known.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def report(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(BENCH))  # the benchmark's modules import each other by bare name
    import gateway_vs_peers_report

    return gateway_vs_peers_report


def _row(server: str, turn: int, ttft_ms: float | None, cached: int | None = None, chat: str = "grow") -> dict:
    return {"server": server, "chat": chat, "turn": turn, "ttft_ms": ttft_ms, "prompt_tokens": 100 * turn,
            "server_prompt_tokens": 100 * turn, "cached_tokens": cached, "completion_tokens": 8,
            "total_ms": None if ttft_ms is None else ttft_ms + 100,
            "error": None if ttft_ms is not None else "HTTP 500: boom"}  # fmt: skip


def test_ttft_ratios_are_bastion_over_each_server_and_turn_one_is_set_apart(report: Any) -> None:
    rows = [
        _row("bastion", 1, 900), _row("bastion", 2, 300), _row("bastion", 3, 500),
        _row("llama_server", 1, 1000), _row("llama_server", 2, 600), _row("llama_server", 3, 1000),
    ]  # fmt: skip
    summary = report.growing_summary({"rows": rows})
    assert summary["servers"]["bastion"]["median_ttft_ms"] == 500
    assert summary["servers"]["bastion"]["median_ttft_ms_after_turn_1"] == 400
    assert summary["bastion_over"]["llama_server"] == {"median_ttft": 0.5, "median_ttft_after_turn_1": 0.5}


def test_a_failed_turn_is_listed_and_left_out_of_the_median(report: Any) -> None:
    rows = [_row("bastion", 1, 400), _row("bastion", 2, 600), _row("llama_server", 1, 500), _row("llama_server", 2, None)]
    summary = report.growing_summary({"rows": rows})
    assert summary["servers"]["llama_server"]["median_ttft_ms"] == 500
    assert summary["servers"]["llama_server"]["failed"] == [{"chat": "grow", "turn": 2, "error": "HTTP 500: boom"}]


def _run(server: str, tok_s: float, tokens: list[int]) -> dict:
    return {"server": server, "run": 1, "aggregate_tok_s": tok_s, "per_stream_tok_s": [tok_s / len(tokens)] * len(tokens),
            "ttft_ms": [100.0] * len(tokens), "tokens": tokens, "errors": []}  # fmt: skip


def test_streams_a_server_cut_short_are_counted_and_marked_in_the_table(report: Any) -> None:
    runs = [_run("bastion", 60, [16, 16]), _run("llama_server", 120, [16, 16]), _run("llama_cpp_python", 30, [0, 16])]
    results = {
        "scenarios": {
            "concurrent": {
                "meta": _meta(concurrent_tokens=16, concurrent_streams=2),
                "data": {"runs": runs, "startup": {}},
            }
        }
    }
    results["scenarios"]["concurrent"]["summary"] = report.summarise("concurrent", results["scenarios"]["concurrent"])
    summary = results["scenarios"]["concurrent"]["summary"]
    assert summary["bastion_over"]["llama_server"] == {"aggregate_tok_s": 0.5}
    assert summary["servers"]["llama_cpp_python"]["streams_cut_short"] == 1
    assert summary["servers"]["llama_server"]["streams_cut_short"] == 0
    text = report.markdown(json.loads(json.dumps(results)))
    headline = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| concurrent")}
    assert "1 of 2 streams cut short" in headline["concurrent (2 streams): aggregate tok/s"]
    assert "0.50" in headline["concurrent: bastion ÷ server"]


def _meta(**profile: int) -> dict:
    return {
        "started": "2026-12-03T00:00:00+00:00",
        "quick": False,
        "profile": {"threads": 2, "n_ctx": 4096, "user_tokens": 150, "reply_tokens": 32, **profile},
        "machine": {"cores": 2, "cpu": "test cpu", "memory_gib": 1.0, "load_average": [0.0, 0.0, 0.0],
                    "bastion_commit": "abc", "llama_cpp_python": "0", "xllamacpp": "0"},  # fmt: skip
        "load_average_end": [0.0, 0.0, 0.0],
    }
