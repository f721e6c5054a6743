"""The guest-level layer: a restore point looked at as a machine, straight from the repository.

Above ``serve/``: a point is served read-only over NBD (:mod:`.served`), and
either a libguestfs appliance reads its file systems (:mod:`.appliance`,
:mod:`.fsck`) or a throwaway QEMU boots it behind temporary overlays
(:mod:`.machine`, :mod:`.boot`). Everything a run starts lives in one
scratch directory (:mod:`.scratch`) and ends with it: on success, failure,
timeout, Ctrl-C and SIGTERM the tear-down removes it; after SIGKILL the
children die with fleece (nbdkit ``--exit-with-parent``, QEMU's parent-death
signal, libguestfs's recovery process) and ``fleece cleanup --stale``
removes the directory. Nothing here writes to the repository:
verdicts are stored by :mod:`fleece.repo.verification`.
"""
