"""Backing up: plan on the export's block status, read, hash, compress, store, commit."""
