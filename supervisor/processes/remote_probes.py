"""Trying each remote engine for `bastion doctor`: one probe process per remote model
(`python -m bastion.worker.remote.probe`, see there for the checks), run side by side, each
bounded in time. A probe that cannot run, crashes or overruns is reported as a failed check,
never as a missing answer."""

from __future__ import annotations

import asyncio
import sys

import msgspec

from bastion.protocol.remote import ProbeStep, RemoteEndpoint, RemoteProbe

# Beyond the remote's own timeouts: the probe process's start and its describe call.
_PROBE_SLACK_S = 15.0


async def probe_remotes(models: list[tuple[str, RemoteEndpoint, int]]) -> list[RemoteProbe]:
    """A RemoteProbe per (name, endpoint, n_ctx), in the order given."""
    return list(await asyncio.gather(*(_probe(name, endpoint, n_ctx) for name, endpoint, n_ctx in models)))


async def _probe(name: str, endpoint: RemoteEndpoint, n_ctx: int) -> RemoteProbe:
    def failed(detail: str) -> RemoteProbe:
        return RemoteProbe(model=name, engine=endpoint.engine, url=endpoint.url,
                           steps=[ProbeStep(name="probe", ok=False, detail=detail)])  # fmt: skip

    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bastion.worker.remote.probe", "--name", name,
            "--remote", msgspec.json.encode(endpoint).decode(), "--n-ctx", str(n_ctx),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    except OSError as exc:
        return failed(f"could not start the probe: {exc}")
    limit = endpoint.connect_timeout_s * 4 + endpoint.idle_timeout_s + _PROBE_SLACK_S
    try:
        out, err = await asyncio.wait_for(process.communicate(), limit)
    except TimeoutError:
        process.kill()
        await process.wait()
        return failed(f"the probe did not finish within {limit:.0f} s")
    try:
        return msgspec.json.decode(out.strip().splitlines()[-1], type=RemoteProbe)
    except (msgspec.DecodeError, IndexError):
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return failed(f"the probe failed (exit {process.returncode}): {tail[0][:300]}")
