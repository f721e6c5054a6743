"""The repository: restore points, chunk indexes and chunks over a backend."""
