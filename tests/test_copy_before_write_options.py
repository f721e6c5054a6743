"""The copy-before-write filter's arguments per QEMU version (a unit test: this machine runs 7.2).

On QEMU >= 9.1 the filter gets ``cbw-timeout``, so a stalled scratch disk
breaks the snapshot instead of stalling the guest's writes; before 9.1 the
option is left out (its arithmetic wraps above 4 s there). The 9.1 path
cannot run on Debian 12's QEMU 7.2, so only the arguments are checked here;
the 7.2 path runs in every real-QEMU backup test.
"""

from __future__ import annotations

import pytest

from fleece.fleecing.setup import CBW_TIMEOUT_SECONDS, copy_before_write_options
from fleece.fleecing.state import DiskState


def disk() -> DiskState:
    return DiskState(drive="vda", key="vda", qdev="/machine/peripheral/vda/virtio-backend",
                     src="fmt-vda", format="qcow2", size=1 << 26, persistent=True, parent=None,
                     level="full", reason=None, discard=False)


@pytest.mark.parametrize("version", [(9, 1, 0), (9, 2, 3), (10, 0, 0)])
def test_qemu_9_1_and_later_get_a_cbw_timeout(version: tuple[int, int, int]) -> None:
    options = copy_before_write_options(disk(), version)
    assert options["cbw-timeout"] == CBW_TIMEOUT_SECONDS
    assert 0 < CBW_TIMEOUT_SECONDS < 30  # below a Linux guest's own I/O timeout
    assert options["on-cbw-error"] == "break-snapshot"


@pytest.mark.parametrize("version", [(7, 1, 0), (7, 2, 0), (8, 2, 2), (9, 0, 4)])
def test_older_qemu_gets_no_cbw_timeout(version: tuple[int, int, int]) -> None:
    assert copy_before_write_options(disk(), version) == {
        "driver": "copy-before-write", "node-name": "fleece-cbw-vda", "file": "fmt-vda",
        "target": "fleece-delta-vda", "on-cbw-error": "break-snapshot", "discard": "unmap"}
