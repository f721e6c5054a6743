"""A point's machine record: the ``machine`` member of the point JSON (docs/format.md).

Its files (the definition, the UEFI variable store, the TPM state) are
stored as chunk objects — cut at the repository's chunk size, named by the
repository's (keyed) hash, compressed and sealed exactly like disk chunks —
so dedup, encryption, ``copy``, ``gc`` and ``verify --deep`` treat them like
the chunks of an index. The point names them, and the point is still the one
object written last.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fleece.errors import RepositoryCorrupt
from fleece.repo.format.codec import encode_chunk
from fleece.repo.repository import Repository

KINDS = ("libvirt", "qemu")
FILE_ROLES = ("definition", "nvram", "tpm")
"""``definition``: the domain XML (libvirt) or the command line as JSON (qemu);
``nvram``: the UEFI variable store file; ``tpm``: swtpm's state directory as a tar."""


INLINE_MAX = 16384
"""Files up to this size live in the point itself (base64), sealed with it: no object of their own."""


@dataclass
class MachineFile:
    """One recorded file: its length, sha256 and the chunks holding it, in order (or its bytes inline)."""

    size: int
    sha256: str
    chunks: list[str]
    """Hex chunk names (the repository's keyed hash in an encrypted repository)."""
    inline: str | None = None
    """Small files: the bytes, base64, in the point instead of ``chunks``."""

    def digests(self) -> list[bytes]:
        return [bytes.fromhex(c) for c in self.chunks]


@dataclass
class MachineRecord:
    """What a point recorded about the machine beside its disks."""

    kind: str
    summary: dict[str, Any] = field(default_factory=dict)
    """Machine type, CPUs, memory, firmware, TPM, NICs, disks (device model, bus, serial, size)."""
    files: dict[str, MachineFile] = field(default_factory=dict)
    moments: dict[str, str] = field(default_factory=dict)
    """Per file role, when it was read relative to the disks' point in time."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "summary": self.summary, "moments": self.moments,
                "files": {k: {"size": f.size, "sha256": f.sha256,
                              **({"inline": f.inline} if f.inline is not None else {"chunks": f.chunks})}
                          for k, f in sorted(self.files.items())}}

    @classmethod
    def from_dict(cls, doc: Any, what: str) -> MachineRecord:
        """Parse a point's ``machine`` member; anything malformed is damage."""
        def bad(why: str) -> RepositoryCorrupt:
            return RepositoryCorrupt(f"{what} has a malformed machine record ({why})")
        if not isinstance(doc, dict):
            raise bad("not an object")
        kind, summary, files, moments = (doc.get("kind"), doc.get("summary"), doc.get("files"),
                                         doc.get("moments", {}))
        if kind not in KINDS:
            raise bad(f"unknown kind {kind!r}")
        if not isinstance(summary, dict) or not isinstance(files, dict) or not isinstance(moments, dict):
            raise bad("summary, files and moments must be objects")
        parsed: dict[str, MachineFile] = {}
        for role, raw in files.items():
            if role not in FILE_ROLES or not isinstance(raw, dict):
                raise bad(f"unknown file {role!r}")
            size, sha, chunks, inline = raw.get("size"), raw.get("sha256"), raw.get("chunks", []), \
                raw.get("inline")
            if (not isinstance(size, int) or isinstance(size, bool) or size < 0
                    or (inline is not None and (not isinstance(inline, str) or chunks))
                    or not isinstance(sha, str) or len(sha) != 64
                    or not isinstance(chunks, list)
                    or not all(isinstance(c, str) and len(c) == 64 and _is_hex(c) for c in chunks)):
                raise bad(f"file {role!r}")
            parsed[role] = MachineFile(size, sha, list(chunks), inline)
        if "definition" not in parsed:
            raise bad("no definition")
        return cls(str(kind), summary, parsed, {str(k): str(v) for k, v in moments.items()})

    def digests(self) -> Iterator[bytes]:
        """Every chunk the record names."""
        for f in self.files.values():
            yield from f.digests()

    def renamed(self, rename: Callable[[bytes], bytes]) -> MachineRecord:
        """The same record with every chunk name mapped (a copy between repositories of other keys)."""
        files = {k: MachineFile(f.size, f.sha256, [rename(d).hex() for d in f.digests()], f.inline)
                 for k, f in self.files.items()}
        return MachineRecord(self.kind, self.summary, files, dict(self.moments))


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def store_file(repo: Repository, data: bytes) -> tuple[MachineFile, int]:
    """Store ``data`` as chunks (dedup: unchanged bytes cost one existence check per chunk).

    Returns the file record and how many objects were written.
    """
    if len(data) <= INLINE_MAX:
        return MachineFile(len(data), hashlib.sha256(data).hexdigest(), [],
                           base64.b64encode(data).decode()), 0
    size = repo.config.chunk_size
    names: list[str] = []
    written = 0
    for start in range(0, max(len(data), 1), size):
        piece = data[start:start + size]
        digest = repo.chunk_name(piece)
        # Mostly unchanged since the last point: ask before compressing. Stored as
        # put_chunk stores a chunk (staged until the point's flush; an Object Lock
        # repository locks it, or keeps an existing one's lock ahead).
        key = repo.chunk_key(digest)
        if repo.lock is not None:
            written += repo.put_immutable(key, encode_chunk(piece, repo.config.compression_level),
                                          probe=True)
        elif not repo.backend.exists(key):
            written += repo.backend.stage(key, encode_chunk(piece, repo.config.compression_level))
        names.append(digest.hex())
    return MachineFile(len(data), hashlib.sha256(data).hexdigest(), names), written


def load_file(repo: Repository, record: MachineFile, what: str) -> bytes:
    """The bytes of a recorded file, every chunk checked, then the whole against its sha256."""
    try:
        data = (base64.b64decode(record.inline, validate=True) if record.inline is not None
                else b"".join(repo.get_chunk(d) for d in record.digests()))
    except binascii.Error:
        raise RepositoryCorrupt(f"the recorded {what} is not valid base64 (damaged)") from None
    if len(data) != record.size or hashlib.sha256(data).hexdigest() != record.sha256:
        raise RepositoryCorrupt(f"the recorded {what} does not match its size and sha256 (damaged)")
    return data


def machine_of(point: Any) -> MachineRecord | None:
    """The point's machine record, or None for points without one (all points before it existed)."""
    raw = getattr(point, "machine", None)
    if raw is None:
        return None
    return MachineRecord.from_dict(raw, f"restore point {point.vm}/{point.id}")
