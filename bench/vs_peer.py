"""bastion against llama-cpp-python's own OpenAI-compatible server (`python -m llama_cpp.server`).

Same model file (SmolLM2-135M Q4_1), n_threads = n_threads_batch = 2, n_ctx
4096, greedy decoding, synthetic user turns of 200 tokens (counted with the
model's tokenizer) and 40-token replies. The peer runs twice, with its
defaults and with `--cache true --cache_type ram`, and is driven as an
OpenAI client drives it: the whole message list each turn, streamed. bastion
runs its real supervisor in a temporary BASTION_HOME and is driven through
the client library with named sessions. Time to first token is timed at the
client for both: from sending the request to the first streamed token.

Scenarios:
  growing      one chat, up to 24 turns: TTFT per turn; where each system fails
  alternating  two chats, switching every turn, 8 turns each: TTFT per turn
  resume       kill -9 bastion's worker under a ~1,500-token session: next turn's TTFT ÷ a full prefill
  concurrent   two models decoding at once: aggregate decode tokens/s ÷ one alone
  latency      cancel → end and kill -9 → error latency, p50/p95
  all          all of them, in that order
  render       re-write the Markdown and the chart from the JSON results, measuring nothing

    python bench/vs_peer.py all                 # the full comparison (about a quarter of an hour, quiet machine)
    python bench/vs_peer.py all --quick         # a tiny version of every scenario (a few minutes)
    python bench/vs_peer.py growing --turns 30
    python bench/vs_peer.py render [--quick]

Results go to bench/results/: vs_peer.json (raw figures; each scenario
replaces its own entry), vs_peer.md (tables) and ttft.png (TTFT curves);
with --quick, vs_peer.quick.* and ttft.quick.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

import vs_peer_report as report
import vs_peer_scenarios as scenarios
from vs_peer_text import Tokenizer, smollm2_path

SCENARIOS = {
    "growing": scenarios.growing,
    "alternating": scenarios.alternating,
    "resume": scenarios.resume,
    "concurrent": scenarios.concurrent,
    "latency": scenarios.latency,
}
# Command-line overrides of the profile: flag -> Profile field.
OVERRIDES = {
    "threads": "threads",
    "n_ctx": "n_ctx",
    "user_tokens": "user_tokens",
    "reply_tokens": "reply_tokens",
    "turns": "growing_turns",
    "alt_turns": "alternating_turns",
    "resume_tokens": "resume_tokens",
    "gen_tokens": "concurrent_tokens",
    "concurrent_runs": "concurrent_runs",
    "concurrent_threads": "concurrent_threads",
    "latency_runs": "latency_runs",
}
_STARTED = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


class Outputs:
    """A benchmark's result files: raw JSON (each scenario replaces its own entry, written whole
    or not at all) and the Markdown made from it; `--quick` runs get `.quick` files."""

    stem = "vs_peer"

    def __init__(self, directory: Path, quick: bool) -> None:
        suffix = ".quick" if quick else ""
        self.json = directory / f"{self.stem}{suffix}.json"
        self.markdown = directory / f"{self.stem}{suffix}.md"
        self.chart = directory / f"ttft{suffix}.png"

    def load(self) -> dict[str, Any]:
        if self.json.exists():
            return json.loads(self.json.read_text())
        return {"scenarios": {}}

    def save(self, results: dict[str, Any]) -> None:
        self.json.parent.mkdir(parents=True, exist_ok=True)
        partial = self.json.with_suffix(".json.partial")
        partial.write_text(json.dumps(results, indent=1) + "\n")
        partial.replace(self.json)

    def render(self, results: dict[str, Any]) -> None:
        self.markdown.parent.mkdir(parents=True, exist_ok=True)
        for name, scenario in results["scenarios"].items():
            scenario["summary"] = report.SUMMARIES[name](scenario["data"])
        drawn = report.chart(results, self.chart)
        self.markdown.write_text(report.markdown(results, self.chart if drawn else None))
        say(f"wrote {self.markdown}" + (f" and {self.chart}" if drawn else ""))


def machine() -> dict[str, Any]:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_kib = 0
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"  # fmt: skip
    except OSError:
        commit = "unknown"
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(memory_kib / 2**20, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "llama_cpp_python": metadata.version("llama_cpp_python"),
        "bastion_commit": commit,
    }


def profile_from(args: argparse.Namespace) -> scenarios.Profile:
    base = scenarios.QUICK if args.quick else scenarios.Profile()
    changes = {field: getattr(args, flag) for flag, field in OVERRIDES.items() if getattr(args, flag) is not None}
    return dataclasses.replace(base, **changes)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=[*SCENARIOS, "all", "render"])
    parser.add_argument("--quick", action="store_true", help="a tiny version (n_ctx 512, a few turns and runs)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--workdir", type=Path, help="keep homes and peer logs here (default: a temp dir)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--n-ctx", type=int)
    parser.add_argument("--user-tokens", type=int)
    parser.add_argument("--reply-tokens", type=int)
    parser.add_argument("--turns", type=int, help="growing: turns")
    parser.add_argument("--alt-turns", type=int, help="alternating: turns per chat")
    parser.add_argument("--resume-tokens", type=int, help="resume: session size before the kill")
    parser.add_argument("--gen-tokens", type=int, help="concurrent: tokens per stream")
    parser.add_argument("--concurrent-runs", type=int)
    parser.add_argument("--concurrent-threads", type=int, help="concurrent: threads per model (default --threads)")
    parser.add_argument("--latency-runs", type=int)
    return parser.parse_args()


def measure(args: argparse.Namespace, outputs: Outputs, workdir: Path) -> int:
    profile = profile_from(args)
    model = smollm2_path()
    tokenizer = Tokenizer(model)
    bench = scenarios.Bench(profile=profile, model=model, tokenizer=tokenizer, workdir=workdir, say=say,
                            banned=tokenizer.end_of_generation_tokens())  # fmt: skip
    say(f"model {model.name}; {dataclasses.asdict(profile)}; work dir {workdir}")
    results = outputs.load()
    failed = []
    for name in SCENARIOS if args.scenario == "all" else [args.scenario]:
        say(f"--- {name}")
        started = time.perf_counter()
        meta = {
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "quick": args.quick,
            "profile": dataclasses.asdict(profile),
            "machine": machine(),
        }
        try:
            data = SCENARIOS[name](bench)
        except Exception:
            traceback.print_exc()
            say(f"{name} failed; its earlier results (if any) are kept")
            failed.append(name)
            continue
        meta["duration_s"] = round(time.perf_counter() - started, 1)
        meta["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        results["scenarios"][name] = {"meta": meta, "data": data}
        outputs.save(results)  # the raw figures first: a failing report must not lose a long run
        outputs.render(results)
        outputs.save(results)
        summary = results["scenarios"][name]["summary"]
        say(f"{name}: {json.dumps({k: v for k, v in summary.items() if k != 'per_turn'})}")
    return 1 if failed else 0


def main() -> int:
    args = parse_args()
    outputs = Outputs(args.out, args.quick)
    if args.scenario == "render":
        outputs.render(outputs.load())
        return 0
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return measure(args, outputs, args.workdir.absolute())
    with tempfile.TemporaryDirectory(prefix="bastion-vs-peer-") as workdir:
        return measure(args, outputs, Path(workdir))


if __name__ == "__main__":
    sys.exit(main())
