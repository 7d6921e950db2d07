"""`python -m bastion.worker.remote.probe --name NAME --remote JSON [--n-ctx N]`: try one remote
engine as its worker would use it and print a `RemoteProbe` (protocol/remote.py) as JSON.

`bastion doctor` runs one per remote model, each in a process of its own (HTTP to a
remote is worker business, and a probe that hangs or crashes takes nothing with it).
The checks, in order, each stopping the rest when it fails:

    api key     the key `api_key_env` / `api_key_file` names can be read
    reachable   the server answers its own description route (/props, /v1/models, /api/show)
    model       it serves the configured model
    context     its context size is known (said by the server, or set in config.toml)
    streaming   a 4-token greedy completion of a short prompt streams and ends

Exit status 0 when every check passed, 1 otherwise; the JSON says which.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence

import msgspec

from bastion.protocol import GenerationStats, RequestFailed, SamplingParams, StopReason, TokenDelta
from bastion.protocol.remote import ProbeStep, RemoteEndpoint, RemoteMode, RemoteProbe
from bastion.protocol.worker_wire import FromWorker, Generate, GenerationFinished
from bastion.worker.remote.core import RemoteCore
from bastion.worker.remote.server_facts import RemoteUnavailable, read_api_key

PROBE_PROMPT = "Hello"
PROBE_TOKENS = 4


def probe(name: str, endpoint: RemoteEndpoint, n_ctx: int = 0) -> RemoteProbe:
    steps: list[ProbeStep] = []

    def report() -> RemoteProbe:
        return RemoteProbe(model=name, engine=endpoint.engine, url=endpoint.url, steps=steps)

    try:
        key = read_api_key(endpoint)
    except RemoteUnavailable as exc:
        steps.append(ProbeStep(name="api key", ok=False, detail=str(exc), fix=exc.fix))
        return report()
    if endpoint.api_key_env or endpoint.api_key_file:
        steps.append(ProbeStep(name="api key", ok=True, detail=f"read from {endpoint.api_key_env or endpoint.api_key_file}"))
    wake = threading.Event()
    core = RemoteCore(endpoint, name=name, n_ctx=n_ctx, wake=wake.set, api_key=key)
    try:
        try:
            description = core.describe()
        except RemoteUnavailable as exc:
            passed = {"reachable": [], "api key": ["reachable"], "engine": ["reachable"], "model": ["reachable"],
                      "context": ["reachable", "model"]}.get(exc.step, [])  # fmt: skip
            steps += [ProbeStep(name=step, ok=True, detail="yes") for step in passed]
            steps.append(ProbeStep(name=exc.step, ok=False, detail=str(exc), fix=exc.fix))
            return report()
        steps.append(ProbeStep(name="reachable", ok=True, detail=f"{endpoint.engine.value} answered at {endpoint.url}"))
        steps.append(ProbeStep(name="model", ok=True, detail=description.gguf_name or endpoint.model or "its default"))
        source = "set in config.toml" if n_ctx else "said by the server"
        steps.append(ProbeStep(name="context", ok=True, detail=f"{description.n_ctx} tokens per request ({source})"))
        steps.append(_streaming(core, wake, endpoint))
        return report()
    finally:
        core.close()


def _streaming(core: RemoteCore, wake: threading.Event, endpoint: RemoteEndpoint) -> ProbeStep:
    out: list[FromWorker] = []
    prompt = PROBE_PROMPT
    if endpoint.mode is RemoteMode.CHAT:  # the conversation itself, as a chat-mode model's formatter writes it
        prompt = json.dumps({"messages": [{"role": "user", "content": PROBE_PROMPT}], "tools": None})
    request = Generate(request_id="probe", session_id="bastion-doctor", prompt=prompt, snapshot=False,
                       sampling=SamplingParams(max_tokens=PROBE_TOKENS, temperature=0.0))  # fmt: skip
    started = time.perf_counter()
    core.start(request, out.append, lambda: False)
    deadline = started + endpoint.connect_timeout_s * 2 + endpoint.idle_timeout_s + 5
    while core.active and time.perf_counter() < deadline:
        wake.wait(timeout=0.5)
        wake.clear()
        core.step()
    elapsed_ms = (time.perf_counter() - started) * 1000
    failure = next((m for m in out if isinstance(m, RequestFailed)), None)
    finished = next((m for m in out if isinstance(m, GenerationFinished)), None)
    if failure is not None:
        return ProbeStep(name="streaming", ok=False, detail=f"{failure.code.value}: {failure.message}",
                         fix="see the server's own log for why it refused a completion")  # fmt: skip
    if finished is None:
        return ProbeStep(name="streaming", ok=False, detail=f"no answer within {elapsed_ms / 1000:.0f} s",
                         fix="the server is overloaded or stalled; raise idle_timeout if it is only slow")  # fmt: skip
    deltas = [m for m in out if isinstance(m, TokenDelta)]
    stats = next((m for m in out if isinstance(m, GenerationStats)), None)
    tokens = stats.completion_tokens if stats else len(deltas)
    if finished.stop_reason not in (StopReason.STOP, StopReason.LENGTH) or not deltas:
        return ProbeStep(name="streaming", ok=False, detail=f"the reply ended {finished.stop_reason.value} with "
                         f"{len(deltas)} text events", fix="check that `engine` matches the server")  # fmt: skip
    first = f"first text after {stats.ttft_ms:.0f} ms, " if stats else ""
    return ProbeStep(name="streaming", ok=True, detail=f"{tokens} tokens streamed ({first}{elapsed_ms:.0f} ms in all)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bastion.worker.remote.probe", description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--remote", required=True, help="JSON of the remote endpoint")
    parser.add_argument("--n-ctx", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        endpoint = msgspec.json.decode(args.remote, type=RemoteEndpoint)
    except msgspec.DecodeError as exc:
        parser.error(f"--remote: {exc}")
    result = probe(args.name, endpoint, args.n_ctx)
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
