"""read_file: a regular file's text, a window of lines at a time.

Arguments: `ReadFileArgs(path, offset=0, limit=None)`; `offset` is the first
line (0-based), `limit` how many lines. Content: the lines as they are in the
file, then notes in brackets when something was done to them (a window was
cut, bytes were replaced). Output past `limits.max_output_bytes` keeps head and
tail (truncated, OUTPUT_CAP).

Refuses directories and special files (a FIFO is never opened for reading, see
`Jail.open_regular`), and binary files (a NUL in the first 8 KiB) larger than
`BINARY_READ_MAX_BYTES`; smaller ones are decoded with replacement characters
and the content says so. The file is streamed, so memory stays at the cap
whatever the file's size.
"""

from __future__ import annotations

import os

from bastion.protocol.sandbox_wire import ReadFileArgs, ToolEnvelope, ToolLimits, TruncationReason
from bastion.tools_sandbox.file_tools.errors import FileToolError
from bastion.tools_sandbox.file_tools.jail import Jail
from bastion.tools_sandbox.file_tools.output_cap import HeadTail
from bastion.tools_sandbox.file_tools.text import SNIFF_BYTES, decode, looks_binary

BINARY_READ_MAX_BYTES = 256 * 1024


def read_file(args: ReadFileArgs, jail: Jail, limits: ToolLimits) -> ToolEnvelope:
    if args.offset < 0 or (args.limit is not None and args.limit < 0):
        raise FileToolError("offset and limit must be 0 or more")
    rel = jail.relative(args.path)
    fd, info = jail.open_regular(rel)
    with os.fdopen(fd, "rb") as file:
        binary = looks_binary(os.pread(fd, SNIFF_BYTES, 0))
        if binary and info.st_size > BINARY_READ_MAX_BYTES:
            raise FileToolError(
                f"refused: '{rel}' is a binary file of {info.st_size} bytes; read_file shows binary files "
                f"only up to {BINARY_READ_MAX_BYTES} bytes"
            )
        out = HeadTail(limits.max_output_bytes)
        end = None if args.limit is None else args.offset + args.limit
        replaced = more = False
        line_count = 0
        for number, line in enumerate(file):
            line_count = number + 1
            if number < args.offset:
                continue
            if end is not None and number >= end:
                more = True  # one line past the window is all we need to know
                break
            text, bad = decode(line)
            replaced |= bad
            out.write(text)
    notes = _notes(args, line_count, more, binary, replaced)
    body = out.render()
    if notes and body and not body.endswith("\n"):
        body += "\n"
    return ToolEnvelope(
        ok=True,
        content=body + "".join(f"[read_file: {note}]\n" for note in notes),
        truncated=out.truncated,
        truncated_reason=TruncationReason.OUTPUT_CAP if out.truncated else None,
    )


def _notes(args: ReadFileArgs, line_count: int, more: bool, binary: bool, replaced: bool) -> list[str]:
    notes = []
    if binary:
        notes.append("binary file, decoded as UTF-8 with U+FFFD for undecodable bytes")
    elif replaced:
        notes.append("not valid UTF-8; undecodable bytes are shown as U+FFFD")
    if args.offset and args.offset >= line_count and not more:
        notes.append(f"offset {args.offset} is past the end: the file has {line_count} lines")
    elif more:
        last = args.offset + (args.limit or 0)
        notes.append(
            f"showed lines {args.offset + 1}-{last} (1-based); more follow, continue with offset={last}"
        )
    return notes
