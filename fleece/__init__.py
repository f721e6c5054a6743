"""fleece: pull-mode backup agent for running QEMU virtual machines.

Layers, each knowing only the one below it (docs/design.md §1):
``fleece.qmp`` (QMP session) → ``fleece.fleecing`` (point-in-time NBD
export) → ``fleece.backup.reader`` (block status + parallel reads) →
``fleece.backup.pipeline`` (hash, compress) → ``fleece.repo`` (restore points over a
backend). ``fleece.commands`` and ``fleece.cli`` sit on top.
"""

__version__ = "0.1.0"
