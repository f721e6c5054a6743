"""How far one NBD request on a point-in-time export may reach, by QEMU version (docs/design.md §2.4).

QEMU before 8.0 answers a request to the copy-before-write snapshot wrongly
when it starts in a cluster the guest has overwritten since the point and
reaches past it: ``hbitmap_status()`` returned "not copied" for a range that
starts copied and turns uncopied (fixed upstream by a4d5224c2cb6, "hbitmap:
fix hbitmap_status() return value for first dirty bit case", first in 8.0.0),
so the filter read that run from the live disk. Block status then reported
the guest's new zeroes as holes, a structured read's holes came from the
same answer, and a read returned the guest's new bytes. Inside one cluster
the filter's "copied" bitmap has a single bit, so a request that stays inside
one aligned cluster is answered right. QEMU's NBD server keeps a client's
request whole: the bound is the client's to keep, and fleece exports on those
versions only to a reader that says it keeps it.
"""

from __future__ import annotations

from fleece.errors import ExportError

CBW_CLUSTER = 65536
"""The copy-before-write filter's cluster: fleece's reverse delta is a plain file, so QEMU's
block-copy uses its default (64 KiB) on every supported version."""
HBITMAP_STATUS_FIXED = (8, 0, 0)
"""First QEMU whose copy-before-write snapshot answers every request right: before it,
``hbitmap_status()`` called a range that starts in an already-copied run and goes past it
"not copied", and QEMU answered it from the live disk (docs/design.md §2.4)."""


def parse_qemu_version(text: str | None) -> tuple[int, int, int] | None:
    """``"7.2.22"`` → ``(7, 2, 22)``; None when it is not of that form."""
    parts = (text or "").split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1]), int(parts[2])


def max_request(qemu_version: tuple[int, int, int] | None) -> int | None:
    """How far one NBD read or block-status request on the export may reach, or None: any.

    On QEMU before 8.0 (or an unknown version), every request must lie within one
    :data:`CBW_CLUSTER`-aligned cluster: inside one cluster the filter's answer cannot be
    wrong (its "copied" bitmap has one bit per cluster). QEMU's own NBD server keeps a
    client's request whole, and answers a structured read's holes and a block-status
    request from the same bitmap over the client's whole range, so the bound is the
    client's to keep.
    """
    if qemu_version is not None and qemu_version >= HBITMAP_STATUS_FIXED:
        return None
    return CBW_CLUSTER


def refuse_unbounded_reader(version: tuple[int, int, int], bounded_requests: bool) -> None:
    """Raise, changing nothing, when ``version`` needs bounded requests the reader did not promise."""
    bound = max_request(version)
    if bound is None or bounded_requests:
        return
    raise ExportError(
        f"QEMU {'.'.join(map(str, version))} answers an NBD request that starts in a cluster the "
        "guest overwrote after the snapshot point and reaches past it from the live disk (QEMU bug "
        "'hbitmap: fix hbitmap_status() return value for first dirty bit case', fixed in 8.0); "
        f"export only for a reader that keeps every read and block-status request inside one "
        f"{bound}-byte-aligned block of {bound} bytes: pass --bounded-requests (API: "
        "bounded_requests=True) if yours does, as docs/export.md's reader does; nothing was changed")
