"""Telling text from binary and decoding file bytes for the model.

Owns the sniff (a NUL byte in the first block means binary, as git and grep
decide) and decoding that never fails: bytes that are not UTF-8 become U+FFFD
and the caller is told so it can say so.
"""

from __future__ import annotations

SNIFF_BYTES = 8192


def looks_binary(head: bytes) -> bool:
    return b"\0" in head[:SNIFF_BYTES]


def decode(data: bytes) -> tuple[str, bool]:
    """The text, and whether any byte had to be replaced."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace"), True
