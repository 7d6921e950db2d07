"""`python -m bastion.worker`: parse the command line, build the config and the
engine factory, run `WorkerProc`, exit with its code (see lifecycle.py).

Logs go to stderr, one line each; the supervisor keeps the tail for crash reports.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

import msgspec

from bastion.protocol import MAX_PARALLEL, KvCacheType
from bastion.protocol.remote import RemoteEndpoint
from bastion.worker.config import EngineKind, WorkerConfig
from bastion.worker.engine import Engine
from bastion.worker.lifecycle import ExitCode
from bastion.worker.proc import EngineFactory, WorkerProc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bastion.worker", description="A bastion model worker.")
    parser.add_argument("--endpoint", required=True, help="the supervisor's workers ROUTER endpoint")
    parser.add_argument("--worker-id", required=True, help="routing id and Hello name")
    parser.add_argument("--name", required=True, help="the model's name")
    parser.add_argument("--model-path", required=True, help="the GGUF file")
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--flash-attn", choices=["on", "off"], default="on", help="flash attention (llama engine)")
    parser.add_argument("--kv-cache-type", choices=[kind.value for kind in KvCacheType], default="f16",
                        help="how the KV cache is stored (llama engine; q8_0 needs flash attention)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="requests decoded together, each with --n-ctx positions of its own")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit at once if this is not our parent")
    engines = [kind.value for kind in EngineKind]
    parser.add_argument("--engine", choices=engines, default=EngineKind.LLAMA.value)
    parser.add_argument("--remote", default=None,
                        help="JSON of the remote endpoint (remote engine; see bastion.protocol.remote)")
    parser.add_argument("--fake-script", default=None, help="JSON list of reply strings (fake engine)")
    parser.add_argument("--fake-token-delay", type=float, default=0.0, help="seconds per token (fake engine)")
    parser.add_argument("--fake-load-delay", type=float, default=0.0, help="seconds to load (fake engine)")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0)
    defaults = WorkerConfig(endpoint="", worker_id="", name="", model_path="", threads=1)
    parser.add_argument("--kv-ram-bytes", type=int, default=defaults.kv_ram_bytes,
                        help="bytes of per-session KV snapshots kept in RAM (0: none)")
    parser.add_argument("--kv-dir", default="", help="where KV snapshots spill to disk ('': nowhere)")
    parser.add_argument("--kv-disk-bytes", type=int, default=defaults.kv_disk_bytes,
                        help="bytes of KV snapshots kept on disk for this model")
    return parser


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> WorkerConfig:
    script: tuple[str, ...] = ()
    if args.fake_script:
        try:
            with open(args.fake_script, encoding="utf-8") as f:
                replies = json.load(f)
        except (OSError, ValueError) as exc:
            parser.error(f"--fake-script: {exc}")
        if not isinstance(replies, list) or not all(isinstance(r, str) for r in replies):
            parser.error("--fake-script must hold a JSON list of strings")
        script = tuple(replies)
    remote = None
    if args.engine == EngineKind.REMOTE.value:
        if not args.remote:
            parser.error("--engine remote needs --remote")
        try:
            remote = msgspec.json.decode(args.remote, type=RemoteEndpoint)
        except msgspec.DecodeError as exc:
            parser.error(f"--remote: {exc}")
    if not 1 <= args.parallel <= MAX_PARALLEL:
        parser.error(f"--parallel must be between 1 and {MAX_PARALLEL}")
    if args.n_ctx < (0 if remote else 1) or args.threads < 1 or args.heartbeat_interval <= 0 or args.heartbeat_timeout <= 0:
        parser.error("--n-ctx (0: a remote's own), --threads and the heartbeat settings must be positive")
    if args.kv_cache_type != KvCacheType.F16.value and args.flash_attn == "off":
        parser.error(f"--kv-cache-type {args.kv_cache_type} needs flash attention (llama.cpp stores V quantized only then)")
    if args.kv_ram_bytes < 0 or args.kv_disk_bytes < 0:
        parser.error("--kv-ram-bytes and --kv-disk-bytes must not be negative")
    return WorkerConfig(
        endpoint=args.endpoint,
        worker_id=args.worker_id,
        name=args.name,
        model_path=args.model_path,
        n_ctx=args.n_ctx,
        threads=args.threads,
        flash_attn=args.flash_attn == "on",
        kv_cache_type=KvCacheType(args.kv_cache_type),
        parallel=args.parallel,
        parent_pid=args.parent_pid,
        engine=EngineKind(args.engine),
        remote=remote,
        fake_script=script,
        fake_token_delay=args.fake_token_delay,
        fake_load_delay=args.fake_load_delay,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout,
        kv_ram_bytes=args.kv_ram_bytes,
        kv_dir=args.kv_dir,
        kv_disk_bytes=args.kv_disk_bytes,
    )


def engine_factory(config: WorkerConfig) -> EngineFactory:
    """The engine `config` asks for, built lazily: llama_cpp is imported only
    when it is needed, and inside the load that heartbeats cover."""

    def build() -> Engine:
        if config.engine is EngineKind.REMOTE:
            raise AssertionError("a remote model has no engine in this process (WorkerProc serves it)")
        if config.engine is EngineKind.SCRIPTED:
            from bastion.worker.fake import FakeEngine, FakeEngineConfig
            from bastion.worker.script import load_script

            return FakeEngine(
                FakeEngineConfig(
                    script=load_script(config.model_path), n_ctx=config.n_ctx, architecture="scripted", cycle=False,
                    n_seq=config.parallel,
                )
            )
        if config.engine is EngineKind.FAKE:
            from bastion.worker.fake import FakeEngine, FakeEngineConfig

            fake = FakeEngineConfig(
                n_ctx=config.n_ctx, token_delay=config.fake_token_delay, load_delay=config.fake_load_delay,
                n_seq=config.parallel,
            )
            if config.fake_script:
                fake = msgspec.structs.replace(fake, script=config.fake_script)
            return FakeEngine(fake)
        from bastion.worker.llama_engine import LlamaCppEngine, LlamaEngineConfig

        llama = LlamaEngineConfig(model_path=config.model_path, n_ctx=config.n_ctx, threads=config.threads,
                                  flash_attn=config.flash_attn, kv_cache_type=config.kv_cache_type,
                                  n_seq=config.parallel)
        return LlamaCppEngine(llama)

    return build


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    config = _config(parser.parse_args(argv), parser)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format=f"%(asctime)s worker {config.worker_id} %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(WorkerProc(config, engine_factory(config)).run())
    except Exception:
        logging.getLogger(__name__).exception("worker crashed")
        return int(ExitCode.INTERNAL)


if __name__ == "__main__":
    sys.exit(main())
