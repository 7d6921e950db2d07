"""Sizes and durations as people write them, for config files and flags on both sides.

Owns `parse_size` ("8GiB", "512M"), `parse_duration` ("5m", "90s", "-1") and
`format_bytes`, so `bastion run --keep-alive 5m` and `keep_alive = "5m"` in
config.toml mean the same thing. On the wire sizes are bytes and durations
seconds; these strings never cross a socket.
"""

from __future__ import annotations

import math
import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_size(value: object) -> int:
    """Bytes from a positive integer or a string like "8GiB", "512M", "1.5 GB":
    K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB powers of 1000."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f'expected a size such as "8GiB" or "512MiB", got {value!r}')
    number, prefix, binary, byte = match.groups()
    base = 1000 if (byte and not binary and prefix) else 1024
    size = int(float(number) * base ** _POWERS[prefix.lower()])
    if size <= 0:
        raise ValueError(f"a size must be more than 0 bytes, got {value!r}")
    return size


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like "5m", "90s", "1h30m", "500ms" (a
    bare number is seconds). Any negative value means never: returned as -1."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value):
            raise ValueError("a duration cannot be NaN")
        return -1.0 if value < 0 or math.isinf(value) else float(value)
    text = value.strip().lower() if isinstance(value, str) else ""
    negative = text.startswith("-")
    body = text.removeprefix("-").strip()
    try:
        seconds = float(body)
        if not math.isfinite(seconds):
            raise ValueError
    except ValueError:
        parts = _DURATION_PART.findall(body)
        if not body or "".join(number + unit for number, unit in parts) != body:
            raise ValueError(
                f'expected a duration such as "5m", "30s", "1h" or -1 (never), got {value!r}'
            ) from None
        seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    return -1.0 if negative and seconds > 0 else seconds


def format_duration(seconds: float) -> str:
    """`-1` → "never", 300 → "5m", 90 → "1m30s", 2.5 → "2.5s"."""
    if seconds < 0:
        return "never"
    if seconds < 60:
        return f"{seconds:g}s" if seconds == int(seconds) or seconds >= 10 else f"{seconds:.1f}s"
    minutes, rest = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{rest}s" if rest else "")
    return text


def format_bytes(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(size) >= scale:
            return f"{size / scale:.1f} {unit}" if unit == "GiB" else f"{size / scale:.0f} {unit}"
    return f"{size} B"
