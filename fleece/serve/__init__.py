"""Serving a restore point read-only over NBD (``fleece serve``).

``cache`` turns a disk of a restore point into a block device with a
bounded chunk cache and read-ahead; ``plugin`` is the nbdkit Python plugin
that exposes it; ``server`` starts and stops nbdkit around that plugin.
"""
