"""Point-in-time NBD exports of a running VM's disks (image fleecing)."""
