"""edit_file: replace one exact occurrence of a string in a UTF-8 text file.

Arguments: `EditFileArgs(path, old, new)`. `old` must occur exactly once: the
error says when it is missing (with a hint when line endings or surrounding
whitespace are the likely cause) and how many times it occurs when it is
ambiguous. The file is read through the same parent directory fd it is then
replaced in (temp file + rename, atomic_write.py), so a hard link's other names
and a link swapped in meanwhile are never written through. Refused when the
job is not `writable`, and for binary, non-UTF-8 or oversized files.
"""

from __future__ import annotations

import os
import stat

from bastion.protocol.sandbox_wire import EditFileArgs, ToolEnvelope, ToolLimits
from bastion.tools_sandbox.file_tools.atomic_write import WriteTarget, describe, open_target, replace_contents
from bastion.tools_sandbox.file_tools.errors import FileToolError
from bastion.tools_sandbox.file_tools.jail import Jail, refusal
from bastion.tools_sandbox.file_tools.text import looks_binary
from bastion.tools_sandbox.file_tools.write_file import WRITES_OFF


def edit_file(args: EditFileArgs, jail: Jail, limits: ToolLimits) -> ToolEnvelope:
    if not jail.writable:
        raise FileToolError(f"refused: edit_file is disabled: {WRITES_OFF}")
    if not args.old:
        raise FileToolError("'old' is empty: edit_file replaces an exact, non-empty string")
    rel = jail.relative(args.path)
    with open_target(jail, rel, create_parents=False) as target:
        text = _read_text(target, limits)
        count = text.count(args.old)
        if count == 0:
            raise FileToolError(f"'old' was not found in '{rel}'" + _miss_hint(text, args.old))
        if count > 1:
            raise FileToolError(
                f"'old' occurs {count} times in '{rel}'; include more surrounding text so it matches once"
            )
        at = text.index(args.old)
        data = (text[:at] + args.new + text[at + len(args.old) :]).encode("utf-8")
        if len(data) > limits.file_size_bytes:
            raise FileToolError(
                f"refused: the edited file would exceed the {limits.file_size_bytes}-byte limit"
            )
        replace_contents(jail, target, data)
        line = text.count("\n", 0, at) + 1
        return ToolEnvelope(
            ok=True, content=f"replaced 1 occurrence in '{rel}' at line {line}" + describe(target)
        )


def _read_text(target: WriteTarget, limits: ToolLimits) -> str:
    if target.existing is None:
        raise FileToolError(f"'{target.rel}' does not exist")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(target.name, flags, dir_fd=target.dir_fd)
    except OSError as error:
        raise refusal(target.rel, error) from error
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        # The name was lstat'ed before this open: refuse anything swapped in between.
        if not stat.S_ISREG(info.st_mode) or info.st_ino != target.existing.st_ino:
            raise FileToolError(f"refused: '{target.rel}' changed while it was being opened")
        if info.st_size > limits.file_size_bytes:
            raise FileToolError(
                f"refused: '{target.rel}' is larger than the {limits.file_size_bytes}-byte limit"
            )
        data = file.read(limits.file_size_bytes + 1)
    if looks_binary(data):
        raise FileToolError(f"refused: '{target.rel}' is a binary file; edit_file edits text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise FileToolError(
            f"refused: '{target.rel}' is not valid UTF-8; edit_file edits UTF-8 text"
        ) from error


def _miss_hint(text: str, old: str) -> str:
    if "\r\n" in text and "\n" in old and "\r\n" not in old and old.replace("\n", "\r\n") in text:
        return " (the file uses CRLF line endings; 'old' has bare LF)"
    if old.strip() and old.strip() in text:
        return (
            " (it matches once its leading/trailing whitespace is stripped: check indentation and newlines)"
        )
    return ""
