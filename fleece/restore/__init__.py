"""Reading restore points back: random access, raw/qcow2/device/NBD targets, live restore."""
