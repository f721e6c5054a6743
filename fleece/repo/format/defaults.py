"""The one home of each default a new repository or backup takes when the user names none.

The command line (``init``, ``backup``, ``copy``), a ``--config`` file (whose
keys fall back to the command line's defaults) and the Python API
(:meth:`fleece.repo.repository.Repository.init`,
:class:`fleece.backup.job.BackupRequest`,
:class:`fleece.backup.pipeline.PipelineSettings`) all import them from
here, so they cannot drift apart (``tests/test_defaults.py``).
"""

from __future__ import annotations

DEFAULT_ZSTD_LEVEL = 1
"""zstd's fastest level: on two cores the backup window is bound by compression, and level 1
costs about a third less CPU than level 3 for a few per cent more bytes (docs/performance.md)."""

DEFAULT_COMPRESS = f"zstd:{DEFAULT_ZSTD_LEVEL}"
"""``--compress`` as the user would write the default."""

DEFAULT_HASH = "blake3"
"""New repositories name chunks by BLAKE3 (keyed when encrypted): about 3.5x cheaper than
sha256 on the backup's hot path. Existing repositories keep the hash their config names."""

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
"""4 MiB: index and request counts stay small on S3, and an incremental's small writes
become deltas (format 2) rather than whole chunks."""
