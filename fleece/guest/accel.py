"""Which accelerator a throwaway QEMU (or libguestfs's appliance) can use here: probe, never assume.

``/dev/kvm`` may exist while QEMU aborts under it (seen: ``failed to set
MSR 0x10a`` with ``-cpu host`` in nested set-ups), so the probe starts the
very QEMU that would run, paused, asks QMP whether it is up, and quits.
"""

from __future__ import annotations

import functools
import os
import subprocess

QEMU = "qemu-system-x86_64"


@functools.cache
def kvm_works(qemu: str = QEMU) -> bool:
    """Whether ``qemu -accel kvm -cpu host`` starts a machine on this host (cached per process)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    script = ('{"execute":"qmp_capabilities"}\n{"execute":"query-status"}\n'
              '{"execute":"quit"}\n')
    try:
        done = subprocess.run(
            [qemu, "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-nodefaults", "-nographic",
             "-m", "64", "-S", "-qmp", "stdio", "-serial", "none", "-monitor", "none"],
            input=script, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and '"status"' in done.stdout


def qemu_accel_args() -> list[str]:
    """``-accel kvm -cpu host`` where that works, else TCG with its most capable CPU model."""
    if kvm_works():
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg", "-cpu", "max"]
