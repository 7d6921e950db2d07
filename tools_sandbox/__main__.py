"""`python -m bastion.tools_sandbox`: a tool sandbox process for one supervisor.

Probes what confinement this machine allows, connects to the supervisor's
tools socket, and serves tool calls until told to stop. Exit codes: 0 clean,
2 bad command line, 3 protocol mismatch, 4 the supervisor is gone.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from bastion.tools_sandbox.confine import probe
from bastion.tools_sandbox.proc import SandboxConfig, SandboxProc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bastion.tools_sandbox", description=__doc__)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--sandbox-id", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s sandbox %(name)s: %(message)s")
    # SIGTERM ends the serve loop through KeyboardInterrupt's path: exit cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    config = SandboxConfig(endpoint=args.endpoint, sandbox_id=args.sandbox_id, parent_pid=args.parent_pid,
                           heartbeat_interval=args.heartbeat_interval, heartbeat_timeout=args.heartbeat_timeout)
    report = probe()
    return SandboxProc(config, report).run()


if __name__ == "__main__":
    sys.exit(main())
