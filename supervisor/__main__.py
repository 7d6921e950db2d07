"""`python -m bastion.supervisor`: run the supervisor in the foreground.

Logs go to stderr (a client that starts it in the background points stderr at
`<home>/logs/supervisor.log`). Exit codes: 0 after a clean shutdown, 3 when a
supervisor already runs for this home. An invalid config.toml does not stop it:
every request that needs the registry reports the error until the file is fixed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from bastion.protocol import HomeLayout
from bastion.supervisor.config import SupervisorConfig
from bastion.supervisor.daemon import (
    EXIT_ALREADY_RUNNING,
    AlreadyRunningError,
    SupervisorDaemon,
    acquire_lock,
)
from bastion.supervisor.errors import AuditError, RegistryError, StoreError
from bastion.supervisor.models.memory import memory_budget_argument
from bastion.supervisor.models.registry import RegistryWatcher
from bastion.supervisor.store.sessions import SessionStore, database_path
from bastion.supervisor.trust.approvals import ApprovalStore
from bastion.supervisor.trust.audit import AuditLog


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bastion.supervisor", description=__doc__)
    defaults = SupervisorConfig()
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--heartbeat-interval", type=float, default=defaults.heartbeat_interval_s,
                        help="seconds between heartbeats to workers")
    parser.add_argument("--worker-silence-limit", type=float, default=defaults.worker_silence_limit_s,
                        help="seconds without a heartbeat after which a worker is killed as hung")
    parser.add_argument("--max-queued-per-worker", type=int, default=defaults.max_queued_per_worker,
                        help="requests that may wait for one busy model; one more is answered busy")
    parser.add_argument("--worker-stall-limit", type=float, default=defaults.worker_stall_limit_s,
                        help="seconds a busy worker may go without progress before it is killed as hung")
    parser.add_argument("--restart-first-backoff", type=float, default=defaults.restart_first_backoff_s,
                        help="seconds before restarting after the first crash in the window")
    parser.add_argument("--restart-backoff", type=float, default=defaults.restart_backoff_s,
                        help="seconds before restarting a crashed worker (doubles per crash)")
    parser.add_argument("--restart-backoff-max", type=float, default=defaults.restart_backoff_max_s,
                        help="the longest wait before a restart")
    parser.add_argument("--restart-limit", type=int, default=defaults.restart_limit,
                        help="crashes within --restart-window that mark a model failed")
    parser.add_argument("--restart-window", type=float, default=defaults.restart_window_s,
                        help="seconds over which crashes are counted")
    parser.add_argument("--memory-budget", type=memory_budget_argument(defaults.memory_available_bytes),
                        default=None, metavar="SIZE",
                        help='memory loaded models may hold by their estimates, e.g. "8GiB", or "60%%" of what '
                             "is available now (default: [memory] budget in config.toml, else 80%%)")
    parser.add_argument("--no-share-cores", action="store_true",
                        help="let every worker use its full thread count even while others generate")
    parser.add_argument("--pin-cores", action="store_true",
                        help="pin each generating worker to its own cores (see bench/vs_peer.py concurrent)")
    args = parser.parse_args(argv)
    config = SupervisorConfig(
        share_cores=not args.no_share_cores,
        pin_cores=args.pin_cores,
        memory_budget_bytes=args.memory_budget,
        memory_available_bytes=defaults.memory_available_bytes,
        heartbeat_interval_s=args.heartbeat_interval,
        worker_silence_limit_s=args.worker_silence_limit,
        max_queued_per_worker=args.max_queued_per_worker,
        worker_stall_limit_s=args.worker_stall_limit,
        restart_first_backoff_s=args.restart_first_backoff,
        restart_backoff_s=args.restart_backoff,
        restart_backoff_max_s=args.restart_backoff_max,
        restart_limit=args.restart_limit,
        restart_window_s=args.restart_window,
    )
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    layout = HomeLayout.from_env()
    layout.ensure()
    try:
        lock = acquire_lock(layout)
    except AlreadyRunningError as exc:
        print(f"bastion supervisor: {exc}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    registry = RegistryWatcher(layout)
    try:
        registry.current()
    except RegistryError as exc:
        # Keep serving: each request reports the error until the file is fixed.
        logging.getLogger("bastion.supervisor").error("%s", exc.message)
    try:
        store = SessionStore.open(database_path(layout))
        approvals = ApprovalStore.open(database_path(layout))
        audit = AuditLog.open(layout.audit_log)
    except (StoreError, AuditError) as exc:
        print(f"bastion supervisor: {exc.message}", file=sys.stderr)
        return 1
    if audit.recovered is not None:
        logging.getLogger("bastion.supervisor").warning(
            "the audit log ended in a torn record (a crash mid-write); it was moved to %s",
            audit.recovered.quarantine,
        )
    interrupted = store.interrupt_unfinished_runs()
    if interrupted:
        logging.getLogger("bastion.supervisor").warning(
            "%d run(s) were cut short by the previous supervisor's end; marked interrupted", interrupted
        )
    with lock, store, approvals, audit:
        asyncio.run(_serve(layout, registry, config, store, approvals, audit))
    return 0


async def _serve(
    layout: HomeLayout,
    registry: RegistryWatcher,
    config: SupervisorConfig,
    store: SessionStore,
    approvals: ApprovalStore,
    audit: AuditLog,
) -> None:
    daemon = SupervisorDaemon(layout=layout, config=config, registry=registry, store=store, approvals=approvals,
                              audit=audit)
    await daemon.serve()


if __name__ == "__main__":
    sys.exit(main())
