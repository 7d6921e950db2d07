"""Where the throughput of concurrent streams goes: the same batched decode measured layer by layer.

    .venv/bin/python bench/batched_layers.py [--streams 4] [--tokens 96] [--runs 3]

SmolLM2-135M Q4_1, 2 threads, n_ctx 4096 per sequence, `parallel` = the stream count, greedy,
end of generation ignored; each run sends every stream at once and times from the first send
to the last token. Layers, each measured on its own (runs interleaved):

  in-process   WorkerCore over LlamaCppEngine in this process: the engine and the scheduler
  worker       the worker process (`python -m bastion.worker`) driven over its ZeroMQ socket by
               a minimal supervisor here: adds the link thread, framing and the socket
  gateway      `bastion up --http` and streaming OpenAI requests over HTTP: adds the supervisor,
               the gateway and HTTP, each another process on the same cores

The CPU each process used during the gateway runs is reported too. Writes
bench/results/batched_layers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import zmq
from vs_peer import machine, say
from vs_peer_server import free_port
from vs_peer_text import smollm2_path

from bastion.protocol import (
    PROTOCOL_VERSION,
    Heartbeat,
    Hello,
    HelloAccepted,
    SamplingParams,
    supervisor_worker_codec,
)
from bastion.protocol.worker_wire import Generate, GenerationFinished, WorkerReady

RESULTS = Path(__file__).parent / "results"
N_CTX = 4096
THREADS = 2


def prompt_of(index: int, run: int) -> str:
    return (f"<|im_start|>user\nTell me a long story about lighthouse keeper number {index} (take {run})."
            "<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip


def sampling(tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, loop_guard=False)


def in_process(model: Path, streams: int, tokens: int, runs: int) -> list[float]:
    from bastion.worker.core import WorkerCore
    from bastion.worker.llama_engine import LlamaCppEngine, LlamaEngineConfig

    engine = LlamaCppEngine(LlamaEngineConfig(model_path=str(model), n_ctx=N_CTX, threads=THREADS, n_seq=streams))
    try:
        core = WorkerCore(engine)
        rates = []
        for run in range(runs):
            started = time.perf_counter()
            for i in range(streams):
                core.start(Generate(request_id=f"r{run}-{i}", session_id=f"s{run}-{i}", prompt=prompt_of(i, run),
                                    sampling=sampling(tokens)), lambda _m: None, lambda: False)  # fmt: skip
            while core.active:
                core.step()
            rates.append(streams * tokens / (time.perf_counter() - started))
            say(f"in-process run {run + 1}/{runs}: {rates[-1]:.1f} tok/s")
        return rates
    finally:
        engine.close()


class _Supervisor:
    """Just enough of the supervisor's side of the worker link to drive one worker."""

    def __init__(self, directory: Path) -> None:
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"ipc://{directory}/w.sock"
        self.router.bind(self.endpoint)
        self.codec = supervisor_worker_codec()
        self.identity = b""
        self.last_beat = 0.0

    def recv(self, timeout_s: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = time.monotonic()
            if self.identity and now - self.last_beat > 1.0:  # the worker leaves after 10 s of silence
                self.send(Heartbeat(seq=1))
                self.last_beat = now
            if self.router.poll(200):
                self.identity, frame = self.router.recv_multipart()
                message = self.codec.decode(frame)
                if not isinstance(message, Heartbeat):
                    return message
        raise TimeoutError("the worker said nothing")

    def send(self, message: Any) -> None:
        self.router.send_multipart([self.identity, self.codec.encode(message)])

    def close(self) -> None:
        self.router.close()
        self.context.term()


def worker_process(model: Path, streams: int, tokens: int, runs: int, workdir: Path) -> list[float]:
    supervisor = _Supervisor(workdir)
    command = [sys.executable, "-m", "bastion.worker", "--endpoint", supervisor.endpoint, "--worker-id", "bench",
               "--name", "smol", "--model-path", str(model), "--threads", str(THREADS), "--n-ctx", str(N_CTX),
               "--parallel", str(streams)]  # fmt: skip
    log = open(workdir / "worker.log", "wb")  # noqa: SIM115 - closed below, after the process
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    try:
        hello = supervisor.recv()
        assert isinstance(hello, Hello), hello
        supervisor.send(HelloAccepted(protocol_version=PROTOCOL_VERSION, supervisor_pid=os.getpid()))
        ready = supervisor.recv()
        assert isinstance(ready, WorkerReady), f"{ready}; read {workdir / 'worker.log'}"
        rates = []
        for run in range(runs):
            started = time.perf_counter()
            for i in range(streams):
                supervisor.send(Generate(request_id=f"r{run}-{i}", session_id=f"s{run}-{i}", prompt=prompt_of(i, run),
                                         sampling=sampling(tokens)))  # fmt: skip
            finished = 0
            while finished < streams:
                finished += isinstance(supervisor.recv(), GenerationFinished)
            rates.append(streams * tokens / (time.perf_counter() - started))
            say(f"worker run {run + 1}/{runs}: {rates[-1]:.1f} tok/s")
        return rates
    finally:
        process.terminate()
        process.wait(30)
        log.close()
        supervisor.close()


def _home_processes(home: Path) -> dict[str, psutil.Process]:
    found = {}
    for process in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            if (process.info["environ"] or {}).get("BASTION_HOME") != str(home) and str(home) not in cmdline:
                continue
            kind = ("worker" if "bastion.worker" in cmdline else "gateway" if "bastion.gateway" in cmdline
                    else "supervisor" if "bastion.supervisor" in cmdline else "")  # fmt: skip
            if kind:
                found[kind] = process
        except psutil.Error:
            continue
    return found


def gateway(model: Path, streams: int, tokens: int, runs: int, workdir: Path) -> tuple[list[float], dict[str, float]]:
    home = workdir / "home"
    home.mkdir()
    (home / "config.toml").write_text(f'default = "smol"\n[models.smol]\npath = "{model}"\nn_ctx = {N_CTX}\n'
                                      f"threads = {THREADS}\nparallel = {streams}\n")  # fmt: skip
    env = {**os.environ, "BASTION_HOME": str(home)}
    bastion = str(Path(sys.executable).with_name("bastion"))
    port = free_port()
    subprocess.run([bastion, "up", "--http", f"127.0.0.1:{port}"], env=env, check=True, capture_output=True,
                   timeout=180)  # fmt: skip
    clients = [httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) for _ in range(streams)]
    cpu: dict[str, float] = {}
    try:
        def ask(client: httpx.Client, index: int, run: int, n: int) -> None:
            body = {"model": "smol", "stream": True, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                    "messages": [{"role": "user", "content": f"Tell me story {index} (take {run})."}]}  # fmt: skip
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                for _ in response.iter_lines():
                    pass

        ask(clients[0], 0, -1, 4)  # loads the model outside the timing
        processes = _home_processes(home)
        before = {kind: sum(p.cpu_times()[:2]) for kind, p in processes.items()}
        rates = []
        for run in range(runs):
            threads = [threading.Thread(target=ask, args=(clients[i], i, run, tokens)) for i in range(streams)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(300)
            rates.append(streams * tokens / (time.perf_counter() - started))
            say(f"gateway run {run + 1}/{runs}: {rates[-1]:.1f} tok/s")
        cpu = {kind: round((sum(p.cpu_times()[:2]) - before[kind]) / runs, 2) for kind, p in processes.items()}
        return rates, cpu
    finally:
        for client in clients:
            client.close()
        subprocess.run([bastion, "down"], env=env, capture_output=True, timeout=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    model = smollm2_path()
    with tempfile.TemporaryDirectory(prefix="bastion-layers-") as directory:
        workdir = Path(directory)
        say("--- in-process")
        inproc = in_process(model, args.streams, args.tokens, args.runs)
        say("--- worker process")
        worker = worker_process(model, args.streams, args.tokens, args.runs, workdir)
        say("--- gateway")
        through_gateway, cpu = gateway(model, args.streams, args.tokens, args.runs, workdir)
    medians = {"in_process": statistics.median(inproc), "worker": statistics.median(worker),
               "gateway": statistics.median(through_gateway)}  # fmt: skip
    results = {"machine": machine(), "streams": args.streams, "tokens": args.tokens, "runs": args.runs,
               "tok_s": {"in_process": inproc, "worker": worker, "gateway": through_gateway},
               "median_tok_s": {k: round(v, 1) for k, v in medians.items()},
               "cpu_s_per_run_during_gateway": cpu}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batched_layers.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"{args.streams} streams × {args.tokens} tokens, aggregate tok/s (median of {args.runs}):")
    for layer, value in medians.items():
        print(f"  {layer:<11} {value:6.1f}  ({value / medians['in_process']:.2f} of in-process)")
    print("CPU seconds per gateway run: " + ", ".join(f"{k} {v}" for k, v in sorted(cpu.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
