"""Figures from the raw results: the ratios, a Markdown snippet and a PNG of the TTFT curves.

Everything here is computed from the JSON results file alone, so a report can
be re-rendered (`vs_peer.py render`) without measuring again.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

LABELS = {
    "bastion": "bastion",
    "peer": "llama_cpp.server",
    "peer_cache": "llama_cpp.server --cache (ram)",
}
SYSTEMS = tuple(LABELS)
RATIO_TURN = 7  # the alternating scenario's headline turn


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _ok(r: dict[str, Any] | None) -> bool:
    return r is not None and not r["error"] and r["ttft_ms"] is not None


def percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 1)


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


# --- summaries ------------------------------------------------------------


def growing_summary(data: dict[str, Any]) -> dict[str, Any]:
    by = {s: {r["turn"]: r for r in data["rows"] if r["system"] == s} for s in SYSTEMS}
    turns = sorted({r["turn"] for r in data["rows"]})
    failed_at = {s: next((t for t in turns if t in by[s] and not _ok(by[s][t])), None) for s in SYSTEMS}
    per_turn = []
    for t in turns:
        rows = {s: by[s].get(t) for s in SYSTEMS}
        bastion = rows["bastion"]
        per_turn.append({
            "turn": t,
            "prompt_tokens": {s: r["prompt_tokens"] for s, r in rows.items() if r},
            "ttft_ms": {s: r["ttft_ms"] if _ok(r) else None for s, r in rows.items() if r},
            "bastion_cached": bastion["cached_tokens"] if bastion else None,
            "bastion_pruned": bool(bastion and bastion["details"].get("pruned_messages")),
            "bastion_over_peer": _ratio(bastion["ttft_ms"], rows["peer"]["ttft_ms"])
            if _ok(bastion) and _ok(rows["peer"]) else None,
            "bastion_over_peer_cache": _ratio(bastion["ttft_ms"], rows["peer_cache"]["ttft_ms"])
            if _ok(bastion) and _ok(rows["peer_cache"]) else None,
        })  # fmt: skip
    later = [p for p in per_turn if p["turn"] > 1]
    return {
        "turns": len(turns),
        "failed_at": failed_at,
        "failure": {s: by[s][t]["error"] for s, t in failed_at.items() if t is not None},
        "bastion_answered": sum(1 for r in by["bastion"].values() if _ok(r)),
        "bastion_pruned_at": [p["turn"] for p in per_turn if p["bastion_pruned"]],
        "per_turn": per_turn,
        # Turn 1 is a cold prefill everywhere; after it, while both fit.
        "median_bastion_over_peer": _median([p["bastion_over_peer"] for p in later if p["bastion_over_peer"]]),
        "median_bastion_over_peer_cache": _median(
            [p["bastion_over_peer_cache"] for p in later if p["bastion_over_peer_cache"]]
        ),
    }


def alternating_summary(data: dict[str, Any]) -> dict[str, Any]:
    turns = sorted({r["turn"] for r in data["rows"]})
    per_turn = []
    for t in turns:
        means = {}
        for s in SYSTEMS:
            values = [r["ttft_ms"] for r in data["rows"] if r["system"] == s and r["turn"] == t and _ok(r)]
            means[s] = round(statistics.mean(values), 1) if values else None
        per_turn.append({"turn": t, "ttft_ms": means, "errors": sum(
            1 for r in data["rows"] if r["turn"] == t and not _ok(r))})  # fmt: skip
    at = min(RATIO_TURN, turns[-1]) if turns else None
    headline = next((p for p in per_turn if p["turn"] == at), None)
    means = headline["ttft_ms"] if headline else {}
    return {
        "turns_per_session": len(turns),
        "per_turn": per_turn,
        "ratio_turn": at,
        "bastion_over_peer": _ratio(means.get("bastion"), means.get("peer")),
        "bastion_over_peer_cache": _ratio(means.get("bastion"), means.get("peer_cache")),
    }


def resume_summary(data: dict[str, Any]) -> dict[str, Any]:
    resumed = data["resumed"]
    full = _median([r["ttft_ms"] for r in data["full_prefill"] if _ok(r)])
    ready_ms = resumed["details"].get("run_start_ms")
    after_ready = round(resumed["ttft_ms"] - ready_ms, 1) if _ok(resumed) and ready_ms is not None else None
    stats = resumed["details"].get("stats", {})
    return {
        "session_tokens": resumed["prompt_tokens"],
        "warm_ttft_ms": data["build"][-1]["ttft_ms"],
        "resume_ttft_ms": resumed["ttft_ms"] if _ok(resumed) else None,
        "resume_error": resumed["error"],
        "worker_start_ms": ready_ms,
        "resume_after_worker_ready_ms": after_ready,
        "cached_tokens": stats.get("cached_tokens"),
        "cache_source": stats.get("cache_source"),
        "full_prefill_ttft_ms": full,
        "full_prefill_prompt_tokens": [r["prompt_tokens"] for r in data["full_prefill"]],
        "resume_over_full": _ratio(resumed["ttft_ms"], full) if _ok(resumed) else None,
        "resume_after_ready_over_full": _ratio(after_ready, full),
    }


def concurrent_summary(data: dict[str, Any]) -> dict[str, Any]:
    variants = data.get("variants") or {"shared": data}  # results from before the variants
    return {name: _concurrent_variant_summary(variant) for name, variant in variants.items()}


def _concurrent_variant_summary(data: dict[str, Any]) -> dict[str, Any]:
    runs = [r for r in data["runs"] if r["alone"]["decode_tok_s"] and r["together"]["aggregate_tok_s"]]
    return {
        "runs": len(data["runs"]),
        "alone_tok_s": _median([r["alone"]["decode_tok_s"] for r in runs]),
        "together_aggregate_tok_s": _median([r["together"]["aggregate_tok_s"] for r in runs]),
        "together_per_stream_tok_s": _median([s for r in runs for s in r["together"]["per_stream_tok_s"]]),
        "aggregate_over_alone": _median(
            [r["together"]["aggregate_tok_s"] / r["alone"]["decode_tok_s"] for r in runs]
        ),
    }


def latency_summary(data: dict[str, Any]) -> dict[str, Any]:
    def figures(samples: list[dict[str, Any]], good: str, expected: str) -> dict[str, Any]:
        values = [s["latency_ms"] for s in samples if s["latency_ms"] is not None]
        return {
            "n": len(samples),
            "as_expected": sum(1 for s in samples if s.get(good) == expected),
            "p50_ms": percentile(values, 50),
            "p95_ms": percentile(values, 95),
            "max_ms": max(values) if values else None,
        }

    return {
        "cancel": figures(data["cancel"], "stop_reason", "cancelled"),
        "crash": figures(data["crash"], "error_code", "worker_died"),
    }


SUMMARIES = {
    "growing": growing_summary,
    "alternating": alternating_summary,
    "resume": resume_summary,
    "concurrent": concurrent_summary,
    "latency": latency_summary,
}


# --- Markdown -------------------------------------------------------------


def _f(value: float | None, digits: int = 0, unit: str = "") -> str:
    return "–" if value is None else f"{value:,.{digits}f}{unit}"


def _how(meta: dict[str, Any], what: str, threads: int | None = None) -> str:
    m, p = meta["machine"], meta["profile"]
    end = f", {meta['load_average_end'][0]:.2f} at the end" if "load_average_end" in meta else ""
    return (
        f"*Measured {meta['started'][:10]} on {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, no GPU, "
        f"load average {m['load_average'][0]:.2f} at the start{end}; SmolLM2-135M-Instruct Q4_1; "
        f"n_threads = n_threads_batch = {threads or p['threads']}, n_ctx {p['n_ctx']}, greedy; {what}; "
        f"llama-cpp-python {m['llama_cpp_python']}, bastion {m['bastion_commit']}.*"
    )


def _memory(data: dict[str, Any]) -> str:
    rss = data.get("rss_bytes", {})
    parts = [f"{LABELS[x]} {rss[x] / 2**20:,.0f} MiB" for x in SYSTEMS if rss.get(x)]
    if rss.get("bastion"):
        parts[0] += (f" (of which KV snapshots {rss.get('bastion_snapshot_ram', 0) / 2**20:,.0f} MiB; "
                     f"{rss.get('bastion_snapshot_disk', 0) / 2**20:,.0f} MiB more on disk)")  # fmt: skip
    return f"Resident memory at the end (bastion: its worker process): {', '.join(parts)}."


def _turn_words(p: dict[str, Any]) -> str:
    return (
        f"{p['user_tokens']}-token user turns, {p['reply_tokens']}-token replies (end of generation suppressed on "
        "both sides); TTFT timed at the client, from sending the request to the first streamed token"
    )


def growing_markdown(meta: dict[str, Any], s: dict[str, Any], data: dict[str, Any]) -> list[str]:
    p = meta["profile"]
    lines = [
        "### One growing chat: time to first token per turn",
        "",
        "| turn | prompt tokens (bastion / server) | bastion | llama_cpp.server | --cache (ram) "
        "| bastion ÷ server | bastion ÷ cache |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fail = s["failed_at"]
    for t in s["per_turn"]:
        cells = []
        for system in SYSTEMS:
            value = t["ttft_ms"].get(system)
            failed = fail[system] is not None and t["turn"] >= fail[system]
            cells.append("fails" if failed and value is None else _f(value, 0, " ms"))
        note = " (pruned)" if t["bastion_pruned"] else ""
        mine, theirs = t["prompt_tokens"].get("bastion"), t["prompt_tokens"].get("peer")
        tokens = _f(mine) if theirs in (None, mine) else f"{_f(mine)} / {_f(theirs)}"
        lines.append(
            f"| {t['turn']} | {tokens}{note} | {' | '.join(cells)} | {_f(t['bastion_over_peer'], 3)} "
            f"| {_f(t['bastion_over_peer_cache'], 3)} |"
        )
    failures = ", ".join(
        f"{LABELS[x]} at turn {fail[x]}" if fail[x] else f"{LABELS[x]} never" for x in SYSTEMS
    )
    why = "; ".join(f"{LABELS[x]}: {error}" for x, error in s["failure"].items())
    lines += [
        "",
        f"Fails: {failures}{f' ({why})' if why else ''}. bastion answered {s['bastion_answered']} of {s['turns']} turns, pruning old turns at "
        f"turn(s) {', '.join(map(str, s['bastion_pruned_at'])) or 'none'}. Median ratio from turn 2 while both "
        f"fit: bastion ÷ server {_f(s['median_bastion_over_peer'], 3)}, bastion ÷ cache "
        f"{_f(s['median_bastion_over_peer_cache'], 3)}. {_memory(data)}",
        "",
        _how(meta, f"one run per turn, the three systems interleaved turn by turn; {_turn_words(p)}"),
    ]
    return lines


def alternating_markdown(meta: dict[str, Any], s: dict[str, Any], data: dict[str, Any]) -> list[str]:
    p = meta["profile"]
    lines = [
        "### Two chats, switching every turn: time to first token (mean of both chats)",
        "",
        "| turn | bastion | llama_cpp.server | --cache (ram) | bastion ÷ server | bastion ÷ cache |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for t in s["per_turn"]:
        v = t["ttft_ms"]
        bold = "**" if t["turn"] == s["ratio_turn"] else ""
        lines.append(
            f"| {t['turn']} | {' | '.join(_f(v[x], 0, ' ms') for x in SYSTEMS)} "
            f"| {bold}{_f(_ratio(v['bastion'], v['peer']), 3)}{bold} "
            f"| {bold}{_f(_ratio(v['bastion'], v['peer_cache']), 3)}{bold} |"
        )
    lines += [
        "",
        f"At turn {s['ratio_turn']}: bastion ÷ server {_f(s['bastion_over_peer'], 3)}, bastion ÷ cache "
        f"{_f(s['bastion_over_peer_cache'], 3)}. {_memory(data)}",
        "",
        _how(meta, f"chats A and B, A1 B1 A2 B2 …, one run each, the three systems interleaved; {_turn_words(p)}"),
    ]
    return lines


def resume_markdown(meta: dict[str, Any], s: dict[str, Any], _data: dict[str, Any]) -> list[str]:
    p = meta["profile"]
    return [
        "### Resuming a session after its worker was killed",
        "",
        "| | time to first token |",
        "|---|---:|",
        f"| next turn, worker alive (before the kill) | {_f(s['warm_ttft_ms'], 0, ' ms')} |",
        f"| next turn after `kill -9` of the worker ({_f(s['session_tokens'])}-token prompt) "
        f"| {_f(s['resume_ttft_ms'], 0, ' ms')} |",
        f"| … of which starting a new worker (to `run_start`) | {_f(s['worker_start_ms'], 0, ' ms')} |",
        f"| … of which after the worker was ready | {_f(s['resume_after_worker_ready_ms'], 0, ' ms')} |",
        f"| full prefill of a prompt that size (fresh one-shot prompt) | {_f(s['full_prefill_ttft_ms'], 0, ' ms')} |",
        f"| **resume ÷ full prefill** | **{_f(s['resume_over_full'], 3)}** |",
        f"| resume after the worker was ready ÷ full prefill | {_f(s['resume_after_ready_over_full'], 3)} |",
        "",
        f"After the kill the worker reused {_f(s['cached_tokens'])} cached tokens (source: "
        f"{s['cache_source'] or '–'}).",
        "",
        _how(meta, f"a named session built to ≥ {p['resume_tokens']} tokens, one kill; full prefill: median of "
                   f"{p['full_prefill_runs']} run(s); {_turn_words(p)}"),
    ]  # fmt: skip


CONCURRENT_LABELS = {
    "shared": "cores shared among busy workers (default)",
    "unshared": "each worker on all its threads (`--no-share-cores`)",
    "pinned": "shared and pinned to their own cores (`--pin-cores`)",
}


def concurrent_markdown(meta: dict[str, Any], s: dict[str, Any], _data: dict[str, Any]) -> list[str]:
    p = meta["profile"]
    lines = [
        "### Two models generating at once",
        "",
        "| threads while both generate | one alone, tok/s | both, aggregate tok/s | per stream | "
        "**aggregate ÷ alone** |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, v in s.items():
        lines.append(
            f"| {CONCURRENT_LABELS.get(name, name)} | {_f(v['alone_tok_s'], 1)} | "
            f"{_f(v['together_aggregate_tok_s'], 1)} | {_f(v['together_per_stream_tok_s'], 1)} | "
            f"**{_f(v['aggregate_over_alone'], 3)}** |"
        )
    runs = max((v["runs"] for v in s.values()), default=0)
    lines += [
        "",
        _how(meta, "SmolLM2 registered twice, one worker each, each configured for those threads; "
                   f"{p['concurrent_tokens']} greedy tokens per stream (end of generation ignored); medians of "
                   f"{runs} run(s) per row, alone and together interleaved; aggregate = tokens that reached the "
                   "client while both streams were decoding, over that window", p.get("concurrent_threads")),
    ]  # fmt: skip
    return lines


def latency_markdown(meta: dict[str, Any], s: dict[str, Any], _data: dict[str, Any]) -> list[str]:
    p = meta["profile"]
    rows = [("cancel: `Cancel` sent → `run_end` received", s["cancel"], "ended `cancelled`"),
            ("crash: `kill -9` of the worker → `error` received", s["crash"], "`worker_died`")]  # fmt: skip
    lines = [
        "### Cancel and crash-detection latency",
        "",
        "| | p50 | p95 | max | runs | as expected |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, f, expected in rows:
        lines.append(
            f"| {name} | {_f(f['p50_ms'], 1, ' ms')} | {_f(f['p95_ms'], 1, ' ms')} | {_f(f['max_ms'], 1, ' ms')} "
            f"| {f['n']} | {f['as_expected']} {expected} |"
        )
    lines += [
        "",
        _how(meta, f"mid-decode, after {p['latency_after_tokens']} streamed tokens of a {p['latency_max_tokens']}"
                   "-token generation; timed at the client; cancel and crash runs interleaved"),
    ]  # fmt: skip
    return lines


MARKDOWN = {
    "growing": growing_markdown,
    "alternating": alternating_markdown,
    "resume": resume_markdown,
    "concurrent": concurrent_markdown,
    "latency": latency_markdown,
}


def markdown(results: dict[str, Any], chart: Path | None) -> str:
    lines = ["## bastion and llama-cpp-python's OpenAI-compatible server", ""]
    if any(s["meta"]["quick"] for s in results["scenarios"].values()):
        lines += ["*A --quick run: a few short turns at a small n_ctx, to check the harness; not a measurement.*", ""]
    for name, render in MARKDOWN.items():
        scenario = results["scenarios"].get(name)
        if scenario:
            lines += render(scenario["meta"], scenario["summary"], scenario["data"]) + [""]
    if chart is not None:
        lines += [f"![time to first token per turn]({chart.name})", ""]
    return "\n".join(lines)


# --- chart ----------------------------------------------------------------


def chart(results: dict[str, Any], path: Path) -> bool:
    """TTFT curves of the growing and alternating scenarios; False when neither was measured."""
    panels = [(n, results["scenarios"][n]) for n in ("growing", "alternating") if results["scenarios"].get(n)]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    styles = {"bastion": ("tab:blue", "o"), "peer": ("tab:red", "s"), "peer_cache": ("tab:orange", "^")}
    for ax, (name, scenario) in zip(axes[0], panels):
        summary = scenario["summary"]
        for system in SYSTEMS:
            points = [(t["turn"], t["ttft_ms"].get(system)) for t in summary["per_turn"]]
            points = [(x, y / 1000) for x, y in points if y is not None]
            color, marker = styles[system]
            ax.plot([x for x, _ in points], [y for _, y in points], marker=marker, color=color, label=LABELS[system])
        failures: dict[int, list[str]] = {}
        for system, turn in summary.get("failed_at", {}).items():
            if turn:
                failures.setdefault(turn, []).append(system)
        for turn, systems in failures.items():
            ax.axvline(turn, color="grey", linestyle=":", linewidth=1)
            who = " and ".join("--cache" if s == "peer_cache" else LABELS[s] for s in systems)
            ax.annotate(f"{who}\nfail{'s' if len(systems) == 1 else ''} here", (turn, 0.98),
                        xycoords=("data", "axes fraction"), ha="right", va="top", fontsize=7, color="grey")
        for t in summary["per_turn"]:
            if t.get("bastion_pruned") and t["ttft_ms"].get("bastion"):
                ax.annotate("pruned", (t["turn"], t["ttft_ms"]["bastion"] / 1000), textcoords="offset points",
                            xytext=(0, -12), ha="center", fontsize=7, color=styles["bastion"][0])
        p = scenario["meta"]["profile"]
        title = "one growing chat" if name == "growing" else "two chats, switching every turn (mean of both)"
        ax.set_title(f"{title}\n{p['user_tokens']}-token turns, n_ctx {p['n_ctx']}", fontsize=10)
        ax.set_xlabel("turn" if name == "growing" else "turn of each chat")
        ax.set_ylabel("time to first token (s, log scale)")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
