"""``fleece unlock``: break a VM's (or gc's) lock lease whose holder is gone.

A backup killed on another host leaves its lease behind; the next backup
takes it over by itself once it has expired (10 minutes by default), or at
once when the holder was a process of this host that no longer exists. This
is for the operator who knows the holder is gone and will not wait: without
``--force`` only a lease that could be taken over anyway is removed.
"""

from __future__ import annotations

import argparse

from fleece.commands.common import add_repo_option, open_repository
from fleece.errors import BadInput, LockHeld
from fleece.repo.format.keys import repo_lock_key, vm_lock_key
from fleece.repo.gc_lock import GC_LOCK
from fleece.repo.lock import break_lease, read_lease


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``unlock`` to the command line."""
    p = sub.add_parser("unlock", help="remove a lock left by a backup (or gc) that is gone")
    add_repo_option(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--vm", metavar="NAME", help="the VM whose writer lock to remove")
    which.add_argument("--gc", action="store_true", help="remove the repository's gc lock")
    p.add_argument("--force", action="store_true",
                   help="remove it even though it has not expired (its holder must be gone)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Remove the lease if it is stale (or ``--force``); say whose it was."""
    vm: str | None = args.vm
    if vm is not None and not vm:
        raise BadInput("--vm needs a name")
    backend = open_repository(args).backend
    key, what = (vm_lock_key(vm), f"VM {vm}") if vm is not None else (
        repo_lock_key(GC_LOCK), "garbage collection")
    info = read_lease(backend, key)
    if info is None:
        print(f"{what} holds no lock in {backend.url}")
        return 0
    holder = f"{info.host} pid {info.pid} since {info.created}"
    stale = info.expired() or info.holder_gone()
    if not stale and not args.force:
        raise LockHeld(
            f"{what} is locked by {holder} (lease expires {info.expires}); if that process is "
            "gone, run again with --force; nothing was removed")
    break_lease(backend, key, what, expected=info)
    state = "expired" if info.expired() else "holder gone" if stale else "forced"
    print(f"removed the lock of {what} held by {holder} ({state}, lease expires {info.expires})")
    if not stale:
        # Its holder cannot renew it back (renewals are compare-and-swaps) and
        # re-reads it before and after committing: it will commit nothing.
        print("if that gc is still running, it stops before its next batch of deletions"
              if vm is None else
              "if that backup is still running, it notices before it commits and "
              "commits nothing")
    return 0
