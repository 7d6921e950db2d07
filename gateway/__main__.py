"""`python -m bastion.gateway`: serve the OpenAI- and Ollama-compatible APIs for one bastion home.

Binds loopback by default. Any other address needs an API key (`--api-key`,
`--api-key-file` or `BASTION_API_KEY`): the gateway refuses to start without
one rather than expose the models to the network. bastion's own agent runs,
sessions and approvals over HTTP are off unless `--agent-runs` turns them on.
The supervisor must be running (`bastion serve` and `bastion up --http` start
it); while it is not, `/health` says 503 and requests fail with 503.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import uvicorn

from bastion.gateway.app import build_app
from bastion.gateway.service import GatewaySettings
from bastion.protocol import HomeLayout
from bastion.protocol.network import DEFAULT_HTTP_PORT, is_loopback


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SystemExit(f"bastion gateway: cannot read the API key file: {exc}") from exc
        if not key:
            raise SystemExit(f"bastion gateway: the API key file {args.api_key_file} is empty")
        return key
    return args.api_key or os.environ.get("BASTION_API_KEY") or None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bastion.gateway", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=DEFAULT_HTTP_PORT)
    parser.add_argument("--api-key", help="require `Authorization: Bearer KEY` (needed off loopback)")
    parser.add_argument("--api-key-file", help="read the API key from this file")
    parser.add_argument("--cors-origin", action="append", default=[], help="allow browser calls from this origin")
    parser.add_argument("--agent-runs", action="store_true",
                        help="serve bastion's agent runs (its tools, workspaces, approvals) and sessions over HTTP")
    parser.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--max-messages", type=int, default=1024)
    parser.add_argument("--pid-file", help="write the process id here (removed at exit)")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    key = _api_key(args)
    local = is_loopback(args.host)
    if not local and key is None:
        print(f"bastion gateway: refusing to serve {args.host} without an API key; pass --api-key or "
              "--api-key-file (or bind 127.0.0.1)", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = GatewaySettings(home=HomeLayout.from_env(), api_key=key, cors_origins=tuple(args.cors_origin),
                               max_body_bytes=args.max_body_bytes, max_messages=args.max_messages,
                               loopback_only=local, agent_runs=args.agent_runs)
    pid_file = Path(args.pid_file) if args.pid_file else None
    if pid_file is not None:
        pid_file.write_text(f"{os.getpid()}\n")
    try:
        # Open streams get a few seconds to end on shutdown; the link then cancels what is left.
        config = uvicorn.Config(build_app(settings), host=args.host.strip("[]"), port=args.port,
                                log_level=args.log_level, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=3)
        server = uvicorn.Server(config)
        server.run()
        return 0 if server.started else 1
    finally:
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
