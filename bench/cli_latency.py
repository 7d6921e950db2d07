"""How long a whole `bastion` command takes, and what `bastion run` adds to the worker's own time.

    .venv/bin/python bench/cli_latency.py [--runs 10]

Starts a private supervisor (a temporary BASTION_HOME with SmolLM2 loaded),
then times, as a shell would see them, `bastion --help`, `bastion status` and
`bastion run "Hi" --max-tokens 1 --json`; for the run, what the command adds
is its wall time minus the worker's time to first token (`generation_stats`
ttft_ms). Medians of --runs calls each, interleaved. `python -c pass` is the
floor any Python command pays on this machine.

The commands run with Python's bytecode cache on, as on a user's machine,
even where the environment turns it off (PYTHONDONTWRITEBYTECODE, set in
some containers): without it every call compiles the client's modules from
source again, about 30 ms. `--no-bytecode-cache` measures that case.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASTION = Path(sys.executable).with_name("bastion")


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return elapsed, done.stdout


def worker_ttft_s(stdout: str) -> float:
    for line in stdout.splitlines():
        event = json.loads(line)
        if event.get("type") == "generation_stats":
            return event["ttft_ms"] / 1000
    raise SystemExit("`bastion run --json` printed no generation_stats")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="keep PYTHONDONTWRITEBYTECODE as the environment has it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bastion-cli-latency-") as home:
        env = {**os.environ, "BASTION_HOME": home}
        if not args.no_bytecode_cache:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            timed([str(BASTION), "--help"], env)  # writes the cache once, outside the timing
        print("starting a private supervisor and loading SmolLM2…", file=sys.stderr)
        timed([str(BASTION), "up"], env)
        try:
            timed([str(BASTION), "load", "smollm2-135m"], env)
            samples: dict[str, list[float]] = {"python -c pass": [], "bastion --help": [], "bastion status": [],
                                               "bastion run (whole)": [], "bastion run, beyond the worker's TTFT": []}  # fmt: skip
            for k in range(args.runs):
                print(f"  round {k + 1}/{args.runs}", file=sys.stderr)
                samples["python -c pass"].append(timed([sys.executable, "-c", "pass"], env)[0])
                samples["bastion --help"].append(timed([str(BASTION), "--help"], env)[0])
                samples["bastion status"].append(timed([str(BASTION), "status"], env)[0])
                wall, out = timed([str(BASTION), "run", "Hi", "--max-tokens", "1", "--temperature", "0", "--json"], env)
                samples["bastion run (whole)"].append(wall)
                samples["bastion run, beyond the worker's TTFT"].append(wall - worker_ttft_s(out))
        finally:
            timed([str(BASTION), "down"], env)
    print(f"\nmedian of {args.runs} (2 cores, {os.uname().machine}):")
    for name, values in samples.items():
        print(f"  {name:<40} {1000 * statistics.median(values):6.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
