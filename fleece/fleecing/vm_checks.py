"""Preflight refusals about the VM itself: disks it no longer owns, devices QEMU cannot export safely.

Both run before anything is changed and end in one line saying why and that
nothing was changed.

* **Migrated away.** Once a migration has finished, the source's block nodes
  are inactive: the destination owns the images and may be writing them.
  QEMU 10 says so per node (``active: false`` in ``query-named-block-nodes``);
  QEMU 7.2 does not, but its run state does (``postmigrate``; ``inmigrate``
  on a destination still waiting for its migration). A snapshot there would
  show an image someone else writes, and a checkpoint bitmap stored into it
  could damage the destination's image.
* **A device in an iothread on QEMU < 9.0.** Its export lives in that
  iothread, and QEMU before the NBD server's client locking rework (9.0)
  calls the NBD server's client-closed callback from the iothread, where an
  assertion (``qemu_in_main_thread() && nbd_server`` in blockdev-nbd.c)
  aborts QEMU — the guest dies — as soon as a reader disconnects. Seen here
  on Debian 12's QEMU 7.2; the 9.0 bound is from QEMU's history, not from a
  test on 9.x.
"""

from __future__ import annotations

from fleece.errors import ExportError, QmpCommandError
from fleece.fleecing.graph import BlockGraph
from fleece.qmp import Disk, QmpSession
from fleece.qmp.answers import query_status

_MIGRATION_STATES = {
    "postmigrate": "its migration has finished and the destination owns its disks now",
    "finish-migrate": "it is finishing a migration",
    "inmigrate": "it is waiting for an incoming migration",
}
SAFE_IOTHREAD_EXPORTS = (9, 0, 0)
"""First QEMU whose NBD server survives a client leaving an export that runs in an iothread."""


async def refuse_inactive_disks(session: QmpSession, graph: BlockGraph, disks: list[Disk]) -> None:
    """``ExportError`` if the VM migrated away (or in) or any of ``disks`` is an inactive node."""
    status = str((await query_status(session)).get("status", ""))
    inactive = [d.name for d in disks if not graph.nodes[d.node_name].active]
    if status in _MIGRATION_STATES:
        why = _MIGRATION_STATES[status]
    elif inactive:
        why = f"its disk nodes are inactive ({', '.join(inactive)}), as after a migration"
    else:
        return
    raise ExportError(f"cannot back up or export this VM: {why} (run state {status}); back up the "
                      "VM where it runs now; nothing was changed")


async def device_iothread(session: QmpSession, qdev: str) -> str | None:
    """The iothread ``qdev``'s I/O runs in (its own, or its controller's), or None."""
    path = qdev
    for _ in range(4):  # device, its bus's controller, and so on up
        for prop in ("iothread", "iothread-vq-mapping"):
            try:
                value = await session.execute("qom-get", {"path": path, "property": prop})
            except QmpCommandError:
                continue
            if value:
                return value if isinstance(value, str) else str(value)
        try:
            bus = await session.execute("qom-get", {"path": path, "property": "parent_bus"})
        except QmpCommandError:
            return None
        if not isinstance(bus, str) or "/" not in bus.rstrip("/"):
            return None
        path = bus.rstrip("/").rsplit("/", 1)[0]  # the bus's owner
    return None


async def refuse_unsafe_iothreads(session: QmpSession, disks: list[Disk],
                                  version: tuple[int, int, int]) -> None:
    """``ExportError`` if a disk's device runs in an iothread on a QEMU that would abort."""
    if version >= SAFE_IOTHREAD_EXPORTS:
        return
    for disk in disks:
        iothread = await device_iothread(session, disk.qdev)
        if iothread:
            raise ExportError(
                f"device {disk.name} runs in iothread {iothread.rsplit('/', 1)[-1]}: QEMU "
                f"{'.'.join(map(str, version))} aborts (killing the guest) when a reader leaves an "
                "NBD export in an iothread, fixed in QEMU 9.0; back up this disk from a VM without "
                "the iothread or on a newer QEMU; nothing was changed")
