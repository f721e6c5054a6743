"""Damaged byte ranges of a disk: how ``verify`` and ``restore`` name what is lost.

Damage is found per chunk (a missing or corrupt chunk object) but reported
per disk as half-open byte ranges ``[start, end)``, with neighbouring chunks
merged, so that an operator reads "bytes 4194304-12582912 of vda" rather
than a list of chunk numbers.
"""

from __future__ import annotations

from collections.abc import Iterable

ByteRange = tuple[int, int]


def chunk_ranges(chunks: Iterable[int], chunk_size: int, disk_size: int) -> list[ByteRange]:
    """Merge chunk numbers into sorted ``[start, end)`` byte ranges clipped to the disk."""
    ranges: list[list[int]] = []
    for i in sorted(set(chunks)):
        start, end = i * chunk_size, min((i + 1) * chunk_size, disk_size)
        if ranges and ranges[-1][1] == start:
            ranges[-1][1] = end
        else:
            ranges.append([start, end])
    return [(a, b) for a, b in ranges]


def describe_ranges(ranges: Iterable[ByteRange], limit: int = 8) -> str:
    """``0-65536, 1048576-2097152 (+3 more)``: ranges for a one-line message."""
    items = list(ranges)
    shown = ", ".join(f"{a}-{b}" for a, b in items[:limit])
    if len(items) > limit:
        shown += f" (+{len(items) - limit} more)"
    return shown


def damaged_bytes(ranges: Iterable[ByteRange]) -> int:
    """Total length of ``ranges``."""
    return sum(b - a for a, b in ranges)
