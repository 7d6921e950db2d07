"""The file-tool child's process shell: `python -m bastion.tools_sandbox.file_tools`.

Reads one msgpack `FileToolJob` from stdin (to EOF), runs it with
`run_file_tool`, writes one msgpack `ToolEnvelope` to stdout and exits 0.
A job that does not decode gets an ok=False envelope and exit 2, so the
launcher can tell its own bug from a tool's failure. Nothing else is ever
written to stdout. The confinement (uid, rlimits, Landlock…) is the launcher's
job and already in force when this starts; this shell adds none and reads no
environment.
"""

from __future__ import annotations

import sys

import msgspec

from bastion.protocol.sandbox_wire import ToolEnvelope
from bastion.tools_sandbox.file_tools.job import FileToolJob
from bastion.tools_sandbox.file_tools.run import run_file_tool

EXIT_BAD_JOB = 2


def main() -> int:
    encoder = msgspec.msgpack.Encoder()
    try:
        job = msgspec.msgpack.Decoder(FileToolJob).decode(sys.stdin.buffer.read())
    except msgspec.DecodeError as error:
        envelope = ToolEnvelope(ok=False, content=f"malformed file-tool job: {error}")
        sys.stdout.buffer.write(encoder.encode(envelope))
        sys.stdout.buffer.flush()
        return EXIT_BAD_JOB
    sys.stdout.buffer.write(encoder.encode(run_file_tool(job)))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
