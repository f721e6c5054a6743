"""The repository: config, chunks, chunk indexes and restore points over a backend.

This is the only module that knows where objects live and how they are
checked on the way in and out; the layout itself is in :mod:`fleece.repo.keys`
and docs/format.md. Locking is separate (:mod:`fleece.repo.lock`): callers
that write points hold the VM's lock.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass

from fleece.codec import DEFAULT_ZSTD_LEVEL, HASHES, MAX_CHUNK_SIZE, decode_chunk, digest_function
from fleece.errors import BadInput, RepositoryCorrupt, RepositoryError
from fleece.repo import keys
from fleece.repo.backend import Backend, ObjectMissing
from fleece.repo.index import ChunkIndex
from fleece.repo.point import RestorePoint
from fleece.repo.store_check import STORE_PREFIX
from fleece.testing import pause_point

REPO_FORMAT = 1
MIN_CHUNK_SIZE = 64 * 1024
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024


def check_chunk_size(chunk_size: int) -> int:
    """Return ``chunk_size`` if format 1 allows it (a power of two, 64 KiB to 16 MiB)."""
    if not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE) or chunk_size & (chunk_size - 1):
        raise BadInput(
            f"chunk size {chunk_size} is not a power of two between 64 KiB and 16 MiB"
        )
    return chunk_size


@dataclass(frozen=True)
class RepositoryConfig:
    """The ``config`` object: fixed when the repository is created."""

    id: str
    chunk_size: int
    compression_level: int | None
    """zstd level for new chunks, or None to store them uncompressed."""
    hash: str = "sha256"
    encryption: str = "none"
    format: int = REPO_FORMAT

    def to_json(self) -> bytes:
        """The ``config`` object's bytes."""
        codec = "none" if self.compression_level is None else "zstd"
        doc = {
            "format": self.format,
            "id": self.id,
            "chunk_size": self.chunk_size,
            "hash": self.hash,
            "compression": {"codec": codec, "level": self.compression_level},
            "encryption": self.encryption,
        }
        return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, blob: bytes, url: str) -> RepositoryConfig:
        """Parse and validate ``config``; refuses what this fleece cannot read."""
        try:
            doc = json.loads(blob)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RepositoryCorrupt(f"{url}: config is not valid JSON") from None
        if not isinstance(doc, dict):
            raise RepositoryCorrupt(f"{url}: config is not a JSON object")
        if doc.get("format") != REPO_FORMAT:
            raise RepositoryError(
                f"{url} has repository format {doc.get('format')!r}; this fleece reads "
                f"format {REPO_FORMAT} (upgrade fleece); nothing was changed"
            )
        try:
            compression = doc["compression"]
            codec, level = compression["codec"], compression["level"]
            config = cls(
                id=str(doc["id"]),
                chunk_size=int(doc["chunk_size"]),
                compression_level=None if codec == "none" else int(level),
                hash=str(doc["hash"]),
                encryption=str(doc["encryption"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RepositoryCorrupt(f"{url}: config is missing or mangles {exc}") from None
        if codec not in ("zstd", "none") or (
            config.compression_level is not None and not 1 <= config.compression_level <= 22
        ):
            raise RepositoryCorrupt(f"{url}: config has unknown compression {compression!r}")
        try:
            check_chunk_size(config.chunk_size)
        except BadInput as exc:
            raise RepositoryCorrupt(f"{url}: config: {exc}") from None
        if config.hash not in HASHES or config.encryption != "none":
            raise RepositoryError(
                f"{url} uses hash {config.hash!r} / encryption {config.encryption!r}, which "
                "this fleece does not support (upgrade fleece)"
            )
        return config


def holds_objects(backend: Backend) -> bool:
    """Whether the location holds anything but the store check's own objects.

    Another host's store check (``store/``) may run while this one decides
    whether to create a repository there; that is not "someone's data".
    """
    return any(not key.startswith(STORE_PREFIX) for key in backend.list(""))


class Repository:
    """A fleece repository on a backend. Use :meth:`open`, :meth:`init` or :meth:`open_or_init`."""

    def __init__(self, backend: Backend, config: RepositoryConfig) -> None:
        self.backend = backend
        self.config = config
        self.url = backend.url
        self.digest = digest_function(config.hash)
        """The chunk-naming hash of this repository (its ``config``'s ``hash``)."""

    # -- creating and opening -----------------------------------------------

    @classmethod
    def init(
        cls,
        backend: Backend,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        compression_level: int | None = DEFAULT_ZSTD_LEVEL,
        repository_id: str | None = None,
        hash: str = "sha256",
    ) -> Repository:
        """Create a repository at an empty location (``BadInput`` if it is one already)."""
        check_chunk_size(chunk_size)
        digest_function(hash)  # BadInput for an unknown name
        if compression_level is not None and not 1 <= compression_level <= 22:
            raise BadInput(f"zstd level must be 1..22, not {compression_level}")
        config = RepositoryConfig(
            id=repository_id or secrets.token_hex(16),
            chunk_size=chunk_size,
            compression_level=compression_level,
            hash=hash,
        )
        if not backend.put(keys.CONFIG_KEY, config.to_json(), if_absent=True):
            raise BadInput(f"{backend.url} already holds a fleece repository; nothing was changed")
        return cls(backend, config)

    @classmethod
    def open(cls, backend: Backend) -> Repository:
        """Open an existing repository; ``BadInput`` if ``backend`` holds none."""
        try:
            blob = backend.get(keys.CONFIG_KEY)
        except ObjectMissing:
            raise BadInput(f"{backend.url} is not a fleece repository (no config)") from None
        return cls(backend, RepositoryConfig.from_json(blob, backend.url))

    @classmethod
    def open_or_init(
        cls,
        backend: Backend,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        compression_level: int | None = DEFAULT_ZSTD_LEVEL,
        hash: str = "sha256",
    ) -> Repository:
        """Open the repository, creating it only where the location holds no objects at all.

        A location holding anything else is refused, so that a typo in
        ``--repo`` never scatters chunks over someone's directory.
        """
        try:
            return cls.open(backend)
        except BadInput:
            if holds_objects(backend):
                raise
        try:
            return cls.init(backend, chunk_size, compression_level, hash=hash)
        except BadInput:
            # Another process initialized it between our look and our put.
            return cls.open(backend)

    # -- chunks -------------------------------------------------------------

    @staticmethod
    def chunk_key(digest: bytes) -> str:
        """``chunks/<2 hex>/<64 hex>``."""
        return keys.chunk_key(digest)

    def has_chunk(self, digest: bytes) -> bool:
        """Whether the chunk is stored (dedup probe)."""
        return self.backend.exists(keys.chunk_key(digest))

    def put_chunk(self, digest: bytes, blob: bytes) -> bool:
        """Store an encoded chunk unless it is there already; False when it was (no write).

        This is the dedup probe for chunks no index names: one existence check
        (a stat, or a HEAD on S3 — cheaper than uploading the bytes again),
        then a conditional create, so two writers racing for one chunk are
        both fine (chunks are immutable). Backends that batch durability
        (``stage``/``flush``, the file backend) publish the chunk only at the
        next :meth:`flush`; the restore point is never written before that.
        """
        key = keys.chunk_key(digest)
        if self.backend.exists(key):
            return False
        stage = getattr(self.backend, "stage", None)
        if stage is not None:
            stage(key, blob)
            stored = True
        else:
            stored = self.backend.put(key, blob, if_absent=True)
        pause_point("chunk-stored")  # test hook (fleece.testing); inert in production
        return stored

    def flush(self) -> None:
        """Make every chunk stored so far durable and visible (a no-op where puts already are)."""
        flush = getattr(self.backend, "flush", None)
        if flush is not None:
            flush()

    def discard_staged(self) -> None:
        """Drop chunks staged by a backup that failed before :meth:`flush`."""
        discard = getattr(self.backend, "discard_staged", None)
        if discard is not None:
            discard()

    def get_chunk(self, digest: bytes) -> bytes:
        """The plaintext of chunk ``digest``, verified; ``RepositoryCorrupt`` if missing or damaged."""
        key = keys.chunk_key(digest)
        try:
            blob = self.backend.get(key)
        except ObjectMissing:
            raise RepositoryCorrupt(f"chunk {key} is missing from {self.url}") from None
        return decode_chunk(blob, digest, self.config.hash)

    # -- indexes ------------------------------------------------------------

    def write_index(self, point_id: str, disk: str, index: ChunkIndex) -> tuple[str, str]:
        """Store a disk's index; returns ``(key, sha256 hex)`` for its :class:`DiskRecord`."""
        key = keys.index_key(point_id, disk)
        blob = index.to_bytes()
        self.flush()  # every chunk the index names is durable before the index exists
        self.backend.put(key, blob)
        return key, hashlib.sha256(blob).hexdigest()

    def read_index(self, point: RestorePoint, disk_name: str) -> ChunkIndex:
        """The index of ``disk_name`` in ``point``, checked against the point and itself."""
        record = point.disk(disk_name)
        if record is None:
            raise BadInput(f"restore point {point.id} has no disk {disk_name!r}")
        what = f"index {record.index_key} of point {point.id}"
        try:
            blob = self.backend.get(record.index_key)
        except ObjectMissing:
            raise RepositoryCorrupt(f"{what} is missing from {self.url}") from None
        if hashlib.sha256(blob).hexdigest() != record.index_digest:
            raise RepositoryCorrupt(f"{what} does not match the digest in the point (damaged)")
        index = ChunkIndex.from_bytes(blob, what)
        if index.chunk_size != point.chunk_size or index.disk_size != record.virtual_size:
            raise RepositoryCorrupt(f"{what} disagrees with the point on chunk or disk size")
        return index

    # -- restore points -----------------------------------------------------

    def write_point(self, point: RestorePoint) -> None:
        """Commit ``point``: call this last, after its chunks and indexes are stored."""
        key = keys.point_key(point.vm, point.id)
        self.flush()
        if not self.backend.put(key, point.to_json(), if_absent=True):
            raise RepositoryError(f"restore point {key} already exists; nothing was written")

    def point_refs(self, vm: str | None = None) -> list[tuple[str, str]]:
        """``(vm, point id)`` of every point, sorted by id, from the keys alone (no reads)."""
        refs = [ref for key in self.backend.list(keys.point_prefix(vm))
                if (ref := keys.parse_point_key(key)) is not None]
        return sorted(refs, key=lambda r: (r[1], r[0]))

    def load_point(self, vm: str, point_id: str) -> RestorePoint:
        """Read and verify one point."""
        key = keys.point_key(vm, point_id)
        what = f"restore point {key}"
        point = RestorePoint.from_json(self.backend.get(key), what)
        if point.id != point_id or point.vm != vm:
            raise RepositoryCorrupt(f"{what} holds point {point.id} of VM {point.vm}")
        return point

    def list_points(self, vm: str | None = None) -> list[RestorePoint]:
        """Every restore point (of ``vm``, if given), sorted by id (= by time)."""
        return [self.load_point(v, p) for v, p in self.point_refs(vm)]

    def find_point(self, point_id: str, vm: str | None = None) -> RestorePoint:
        """The point named by an exact id, a unique id prefix, or ``latest``.

        ``latest`` needs ``vm`` unless the repository holds one VM's points.
        Unknown or ambiguous → ``BadInput``.
        """
        refs = self.point_refs(vm)
        where = self.url if vm is None else f"{self.url} for VM {vm}"
        if point_id == "latest":
            vms = sorted({v for v, _ in refs})
            if len(vms) > 1:
                raise BadInput(
                    f"'latest' is ambiguous: {self.url} holds points of VMs {', '.join(vms)}"
                )
            matches = refs[-1:]
        else:
            matches = [r for r in refs if r[1] == point_id] or [
                r for r in refs if r[1].startswith(point_id)
            ]
        if not matches:
            raise BadInput(f"no restore point {point_id!r} in {where}")
        if len(matches) > 1:
            shown = ", ".join(p for _, p in matches[:5]) + (", …" if len(matches) > 5 else "")
            raise BadInput(f"{point_id!r} matches {len(matches)} restore points: {shown}")
        return self.load_point(*matches[0])

    def delete_point(self, point: RestorePoint) -> None:
        """Remove a point, then its indexes (so no point ever names a missing index)."""
        self.backend.delete(keys.point_key(point.vm, point.id))
        for disk in point.disks:
            self.backend.delete(disk.index_key)

