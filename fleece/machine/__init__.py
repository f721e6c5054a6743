"""Whole machines: what a restore point records beside the disks (docs/machines.md)."""
