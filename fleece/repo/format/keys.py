"""Where each object lives: the key layout of repository formats 1 and 2.

One place for every key, so that the layout in ``docs/format.md`` and the
code cannot drift apart file by file. User-supplied names (VM, disk, lock)
are escaped with :func:`escape_name` before they become a key component.
"""

from __future__ import annotations

import re

from fleece.errors import BadInput

CONFIG_KEY = "config"
CHUNKS_PREFIX = "chunks/"
PACKS_PREFIX = "packs/"
INDEXES_PREFIX = "indexes/"
POINTS_PREFIX = "points/"
VM_LOCKS_PREFIX = "locks/vms/"
REPO_LOCKS_PREFIX = "locks/repo/"
PROTECT_PREFIX = "protect/"
VERIFIED_PREFIX = "verified/"
KEY_OBJECTS_PREFIX = "keys/"

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
# Leaves room under the 255-byte component limit of common file systems.
MAX_ESCAPED_NAME = 200
_ESCAPE = re.compile(r"%([0-9A-F]{2})")
POINT_ID_RE = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6}$")


def escape_name(name: str) -> str:
    """Turn a VM, disk or lock name into one safe, reversible key component.

    Bytes outside ``[A-Za-z0-9_.-]`` and a leading ``.`` become ``%XX``, so
    ``..``, ``/`` and hidden temporary names can never appear.
    """
    if not name:
        raise BadInput("an empty name cannot be stored in the repository")
    raw = name.encode("utf-8", errors="surrogateescape")
    out = []
    for pos, byte in enumerate(raw):
        if byte in _SAFE and not (pos == 0 and byte == ord(".")):
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    escaped = "".join(out)
    if len(escaped) > MAX_ESCAPED_NAME:
        raise BadInput(f"name {name!r} is too long to store in the repository")
    return escaped


def unescape_name(component: str) -> str:
    """Inverse of :func:`escape_name`."""
    raw = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), component)
    # Keys we did not write may hold anything; never fail on them.
    return raw.encode("latin-1", errors="replace").decode("utf-8", errors="surrogateescape")


def check_point_id(point_id: str) -> str:
    """Return ``point_id`` if it has the format-1 shape, else raise ``BadInput``."""
    if not POINT_ID_RE.match(point_id):
        raise BadInput(f"{point_id!r} is not a restore point id (like 20261123T073600.123456Z-3f9a1c)")
    return point_id


def chunk_key(digest: bytes) -> str:
    """``chunks/<2 hex>/<64 hex>`` for a 32-byte sha256 digest."""
    if len(digest) != 32:
        raise ValueError(f"a chunk digest is 32 bytes, not {len(digest)}")
    hexd = digest.hex()
    return f"{CHUNKS_PREFIX}{hexd[:2]}/{hexd}"


def key_object_key(key_id: str) -> str:
    """``keys/<16 hex>``: one passphrase-wrapped copy of an encrypted repository's master key."""
    if not re.fullmatch(r"[0-9a-f]{16}", key_id):
        raise BadInput(f"{key_id!r} is not a key id (16 hex digits)")
    return f"{KEY_OBJECTS_PREFIX}{key_id}"


def pack_key(digest: bytes) -> str:
    """``packs/<2 hex>/<64 hex>``: a pack of deltas (format 2), named like a chunk."""
    if len(digest) != 32:
        raise ValueError(f"a pack digest is 32 bytes, not {len(digest)}")
    hexd = digest.hex()
    return f"{PACKS_PREFIX}{hexd[:2]}/{hexd}"


def index_key(point_id: str, disk: str) -> str:
    """``indexes/<point-id>/<disk>``."""
    return f"{INDEXES_PREFIX}{check_point_id(point_id)}/{escape_name(disk)}"


def point_prefix(vm: str | None = None) -> str:
    """The prefix of every point, or of one VM's points."""
    return POINTS_PREFIX if vm is None else f"{POINTS_PREFIX}{escape_name(vm)}/"


def point_key(vm: str, point_id: str) -> str:
    """``points/<vm>/<point-id>.json``."""
    return f"{point_prefix(vm)}{check_point_id(point_id)}.json"


def parse_point_key(key: str) -> tuple[str, str] | None:
    """``(vm, point_id)`` for a point key, or None for any other key."""
    if not key.startswith(POINTS_PREFIX) or not key.endswith(".json"):
        return None
    parts = key[len(POINTS_PREFIX) : -len(".json")].split("/")
    if len(parts) != 2 or not POINT_ID_RE.match(parts[1]):
        return None
    return unescape_name(parts[0]), parts[1]


def vm_lock_key(vm: str) -> str:
    """``locks/vms/<vm>``: the writer lease of one VM's points."""
    return f"{VM_LOCKS_PREFIX}{escape_name(vm)}"


def repo_lock_key(name: str) -> str:
    """``locks/repo/<name>``: a repository-wide exclusive lease (gc)."""
    return f"{REPO_LOCKS_PREFIX}{escape_name(name)}"


def verification_prefix(vm: str, point_id: str | None = None) -> str:
    """The prefix of one VM's verification records, or of one point's."""
    base = f"{VERIFIED_PREFIX}{escape_name(vm)}/"
    return base if point_id is None else f"{base}{check_point_id(point_id)}/"


def verification_key(vm: str, point_id: str, stamp: str) -> str:
    """``verified/<vm>/<point-id>/<stamp>.json``: one verdict of ``verify --fsck``/``--boot``."""
    return f"{verification_prefix(vm, point_id)}{check_point_id(stamp)}.json"


def parse_verification_key(key: str) -> tuple[str, str, str] | None:
    """``(vm, point_id, stamp)`` for a verification record's key, or None for any other key."""
    if not key.startswith(VERIFIED_PREFIX) or not key.endswith(".json"):
        return None
    parts = key[len(VERIFIED_PREFIX) : -len(".json")].split("/")
    if len(parts) != 3 or not POINT_ID_RE.match(parts[1]) or not POINT_ID_RE.match(parts[2]):
        return None
    return unescape_name(parts[0]), parts[1], parts[2]


def parse_index_key(key: str) -> tuple[str, str] | None:
    """``(point_id, disk)`` for an ``indexes/<point-id>/<disk>`` key, or None for any other key."""
    if not key.startswith(INDEXES_PREFIX):
        return None
    parts = key[len(INDEXES_PREFIX) :].split("/")
    if len(parts) != 2 or not POINT_ID_RE.match(parts[0]) or not parts[1]:
        return None
    return parts[0], unescape_name(parts[1])


_CHUNK_KEY_RE = re.compile(r"^chunks/([0-9a-f]{2})/(\1[0-9a-f]{62})$")


def parse_chunk_key(key: str) -> bytes | None:
    """The digest a ``chunks/<2 hex>/<64 hex>`` key names, or None for any other key."""
    m = _CHUNK_KEY_RE.match(key)
    return bytes.fromhex(m.group(2)) if m else None


def parse_pack_key(key: str) -> bytes | None:
    """The digest a ``packs/<2 hex>/<64 hex>`` key names, or None for any other key."""
    if not key.startswith(PACKS_PREFIX):
        return None
    digest = parse_chunk_key(CHUNKS_PREFIX + key[len(PACKS_PREFIX):])
    return digest


def protect_prefix(vm: str | None = None) -> str:
    """The prefix of every protection marker, or of one VM's."""
    return PROTECT_PREFIX if vm is None else f"{PROTECT_PREFIX}{escape_name(vm)}/"


def protect_key(vm: str, point_id: str) -> str:
    """``protect/<vm>/<point-id>``: the marker that keeps prune away from a point."""
    return f"{protect_prefix(vm)}{check_point_id(point_id)}"
