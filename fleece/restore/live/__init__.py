"""Instant recovery: run a VM on a local image backed by a restore point, and stream the point in.

The VM is started paused (``-S``) with each device on a placeholder node of
the point's disk size. For every disk fleece then

1. serves the point's disk on a private unix socket (nbdkit with fleece's
   plugin, as ``fleece serve``),
2. creates the output qcow2 with the point's zero chunks already marked as
   zero clusters (so nothing reads them from the point), its header naming
   the NBD socket as backing file (so that an image cut off mid-stream never
   passes for a whole one), and ``blockdev-add``\\ s an NBD node
   ``fleece-live-nbd-<key>-<n>`` and the qcow2 node on top of it (backing:
   the NBD node),
3. points the device at the qcow2 node (``qom-set drive``, as fleecing does;
   the VM is paused, so the guest never sees the swap),
4. starts ``block-stream`` (job ``fleece-live-<key>``, copy-on-read filter
   ``fleece-live-cor-<key>``, ``on-error: stop``) and resumes the VM.

Guest writes go to the qcow2 image and are never overwritten (the stream
only fills clusters the image does not have); guest reads of what is not
streamed yet are copied in on the way. When a job concludes the image has
no backing (QEMU rewrites its header), and fleece deletes the NBD node and
the placeholder nodes and stops the server: the VM runs on local images only.

The server speaks NBD without structured replies, so QEMU never asks it for
block status. That matters: QEMU's copy-on-read filter (which the stream job
puts above the image) treats a failed block-status query as "nothing left
to read" and completes the guest's read without data (QEMU 7.2, seen here),
so with a dead server the guest would read stale memory instead of failing.
Without block status the read itself is sent, fails, and the failure policy
below applies. The stream skips the zero chunks all the same: they are
already allocated (as zeroes) in the image.

Failure policy. Until its stream is done a disk depends on fleece's server.
If fleece or the server dies, or a read fails, the stream job pauses, fleece
(if alive) exits 1, and the guest's next read of a region not streamed yet
fails: a device with ``rerror=stop,werror=stop`` pauses the VM (``io-error``)
instead of handing the guest an I/O error. Nothing streamed or written is
lost. ``fleece restore --live --resume`` serves the point again on a new
socket, cancels the stopped job, re-points the qcow2 node's backing at a new
NBD node (``blockdev-reopen``), starts a new stream (it skips what is
already there) and resumes a VM that the failure paused.
"""

from fleece.restore.live.restore import LiveRequest, live_restore, resume

__all__ = ["LiveRequest", "live_restore", "resume"]
