"""The chunk codec: hash, compress and frame one chunk (format in docs/format.md).

A chunk object is a 14-byte header (magic ``FLCK``, version, codec,
plaintext length) and then either a zstd frame or the plain bytes, whichever
is smaller. Everything here runs on the backup and restore hot paths, from
many worker threads at once: zstd contexts are kept per thread (they are not
thread-safe) and the heavy calls (hashlib, zstd, bytes comparison) release
the GIL or run at memcmp speed.
"""

from __future__ import annotations

import hashlib
import hmac
import mmap
import struct
import threading
from collections.abc import Callable
from typing import Any

import blake3
import zstandard

from fleece.errors import BadInput, RepositoryCorrupt
from fleece.repo.format.defaults import DEFAULT_ZSTD_LEVEL

CHUNK_MAGIC = b"FLCK"
DELTA_MAGIC = b"FLDT"
"""A delta (format 2) is framed like a chunk under its own magic: docs/format.md."""
CHUNK_VERSION = 1
CODEC_PLAIN = 0
CODEC_ZSTD = 1
HEADER = struct.Struct("<4sBBQ")
"""magic, version, codec, plaintext length."""

MAX_CHUNK_SIZE = 16 * 1024 * 1024
"""The largest chunk format 1 allows; a header claiming more is corrupt."""

_local = threading.local()
ZERO_BLOCK = bytes(1 << 20)
"""Zeroes to compare with or copy from, a block at a time (no allocation per chunk)."""

Buffer = bytes | bytearray | memoryview


HASHES = ("sha256", "blake3")
"""Content hashes a repository may name its chunks by (``config``'s ``hash``); 32 bytes each."""


def _blake3(data: Buffer) -> bytes:
    return bytes(blake3.blake3(data).digest())


def _sha256(data: Buffer) -> bytes:
    return hashlib.sha256(data).digest()


def digest_function(name: str, key: bytes | None = None) -> Callable[[Buffer], bytes]:
    """The chunk-naming hash called ``name``; keyed with ``key`` in an encrypted repository.

    sha256 runs at ~1.7 GB/s per core with SHA-NI; BLAKE3, which the
    commands choose for new repositories, at ~6 GB/s: that matters when a
    2-core host must hash as fast as QEMU serves NBD (docs/format.md,
    scripts/bench). Keyed, they become
    HMAC-SHA256 and keyed BLAKE3: a name no longer tells whether an object
    holds a guessed plaintext.
    """
    if name not in HASHES:
        raise BadInput(f"unknown chunk hash {name!r} (choose from {', '.join(HASHES)})")
    if key is None:
        return _sha256 if name == "sha256" else _blake3
    if name == "blake3":
        return lambda data: bytes(blake3.blake3(data, key=key).digest())
    return lambda data: hmac.new(key, data, hashlib.sha256).digest()


SPARSE_BLOCK = 4096
"""Format 3: the block size of a chunk's canonical sparse form (docs/format.md)."""
SPARSE_HEADER = struct.Struct("<4sIQ")
"""The sparse form's header: magic ``FLSP``, block size, plaintext length."""


def sparse_digest_function(name: str, key: bytes | None = None) -> Callable[[Buffer], bytes]:
    """Format 3's chunk name: the (keyed) hash ``name`` of the chunk's canonical sparse form.

    The form is the header, a bitmap with one bit per 4 KiB block (set: the
    block is all zero), then only the non-zero blocks, back to back. A chunk
    with holes costs hashing its data, not its holes, and equal content has
    one name whether a block was a hole or written zeroes. Finding the zero
    blocks is one memcmp per block (~1 ms per 4 MiB in Python, against ~10
    for BLAKE3 over it).
    """
    if name not in HASHES:
        raise BadInput(f"unknown chunk hash {name!r} (choose from {', '.join(HASHES)})")

    def new() -> Any:
        if name == "blake3":
            return blake3.blake3(key=key) if key is not None else blake3.blake3()
        return hmac.new(key, digestmod=hashlib.sha256) if key is not None else hashlib.sha256()

    def digest(data: Buffer) -> bytes:
        view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
        length = len(view)
        bitmap = bytearray(-(-length // (8 * SPARSE_BLOCK)))  # ceil(blocks / 8)
        runs: list[tuple[int, int]] = []
        start = -1
        zero = ZERO_BLOCK.startswith
        for k, off in enumerate(range(0, length, SPARSE_BLOCK)):
            if zero(view[off : off + SPARSE_BLOCK]):
                bitmap[k >> 3] |= 1 << (k & 7)
                if start >= 0:
                    runs.append((start, off))
                    start = -1
            elif start < 0:
                start = off
        if start >= 0:
            runs.append((start, length))
        h = new()
        h.update(SPARSE_HEADER.pack(b"FLSP", SPARSE_BLOCK, length))
        h.update(bitmap)
        for a, b in runs:
            h.update(view[a:b])
        return bytes(h.digest())

    return digest


def chunk_digest(data: Buffer, hash: str = "sha256") -> bytes:
    """The hash of the plaintext: the chunk's name in the repository (32 bytes)."""
    return digest_function(hash)(data)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    comp = cache.get(level)
    if comp is None:
        # write_content_size (the default) lets decode check the frame's
        # claimed size before allocating anything.
        comp = cache[level] = zstandard.ZstdCompressor(level=level)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if dec is None:
        dec = _local.decompressor = zstandard.ZstdDecompressor()
    return dec


def encode_chunk(data: Buffer, level: int | None, magic: bytes = CHUNK_MAGIC) -> bytes:
    """Frame ``data`` as a chunk object; ``level`` None stores it uncompressed.

    zstd output is used only when it is smaller than the plaintext, so
    incompressible (e.g. encrypted-at-rest guest) data costs no CPU on restore.
    """
    length = len(data)
    if length > MAX_CHUNK_SIZE:
        raise ValueError(f"chunk of {length} bytes exceeds the format's {MAX_CHUNK_SIZE}")
    if level is not None:
        frame = _compressor(level).compress(data)
        if len(frame) < length:
            return HEADER.pack(magic, CHUNK_VERSION, CODEC_ZSTD, length) + frame
    # One copy (join accepts any buffer), not two (bytes(data), then the concatenation).
    return b"".join((HEADER.pack(magic, CHUNK_VERSION, CODEC_PLAIN, length), data))


def encode_chunk_in_place(frame: bytearray | mmap.mmap, length: int, level: int | None) -> bytes | memoryview:
    """Encode the plaintext at ``frame[HEADER.size : HEADER.size + length]`` as a chunk object.

    The backup's reader threads read each chunk into such a frame, which
    leaves room for the header in front. Stored plain (no ``level``, or zstd
    would not make it smaller), the object is a view of ``frame`` with the
    header written into that room: no chunk-sized copy or allocation, which
    on a 2-core host costs as much as the write itself. The caller keeps
    ``frame`` unchanged until the object is stored. Compressed, it is new
    ``bytes``. The result is byte for byte what :func:`encode_chunk` returns.
    """
    if length > MAX_CHUNK_SIZE:
        raise ValueError(f"chunk of {length} bytes exceeds the format's {MAX_CHUNK_SIZE}")
    view = memoryview(frame)[: HEADER.size + length]
    if level is not None:
        encoded = _compressor(level).compress(view[HEADER.size :])
        if len(encoded) < length:
            return HEADER.pack(CHUNK_MAGIC, CHUNK_VERSION, CODEC_ZSTD, length) + encoded
    HEADER.pack_into(frame, 0, CHUNK_MAGIC, CHUNK_VERSION, CODEC_PLAIN, length)
    return view


def decode_chunk(blob: bytes, expected_digest: bytes | None = None,
                 hash: str | Callable[[Buffer], bytes] = "sha256",
                 magic: bytes = CHUNK_MAGIC, what: str | None = None) -> bytes:
    """Return the plaintext of a chunk object, checking header and (if given) its digest.

    ``hash`` names the repository's hash or is its (keyed) digest function.

    Raises :class:`RepositoryCorrupt` on any mismatch; nothing is modified.
    """
    if what is None:
        what = f"chunk {expected_digest.hex()}" if expected_digest is not None else "chunk"
    codec, length, payload = _open_frame(blob, magic, what)
    if codec == CODEC_PLAIN:
        if len(payload) != length:
            raise RepositoryCorrupt(
                f"{what} holds {len(payload)} plain bytes but its header says {length}"
            )
        data = bytes(payload)
    elif codec == CODEC_ZSTD:
        data = _unzstd(payload, length, what)
    else:
        raise RepositoryCorrupt(f"{what} has unknown codec {codec}")
    digest = digest_function(hash) if isinstance(hash, str) else hash
    if expected_digest is not None and digest(data) != expected_digest:
        raise RepositoryCorrupt(f"{what} does not match its digest (content damaged)")
    return data


def decode_chunk_into(blob: bytes, out: memoryview, expected_digest: bytes,
                      hash: Callable[[Buffer], bytes], what: str) -> None:
    """:func:`decode_chunk` into ``out``, which must be exactly the plaintext's length.

    The restore path: zstd decodes straight into the caller's (reused,
    aligned) buffer, so no chunk-sized object is allocated and copied per
    chunk. Every check of :func:`decode_chunk` is made, the digest last;
    on :class:`RepositoryCorrupt` the contents of ``out`` are undefined.
    """
    codec, length, payload = _open_frame(blob, CHUNK_MAGIC, what)
    if length != len(out):
        raise RepositoryCorrupt(f"{what} holds {length} bytes, expected {len(out)}")
    if codec == CODEC_PLAIN:
        if len(payload) != length:
            raise RepositoryCorrupt(
                f"{what} holds {len(payload)} plain bytes but its header says {length}"
            )
        out[:] = payload
    elif codec == CODEC_ZSTD:
        try:
            claimed = zstandard.frame_content_size(payload)
            if claimed != length:
                raise RepositoryCorrupt(
                    f"{what}: zstd frame says {claimed} bytes but the header says {length}"
                )
            reader = _decompressor().stream_reader(payload, read_size=len(payload))
            got = 0
            while got < length:
                n = reader.readinto(out[got:])
                if not n:
                    break
                got += n
        except zstandard.ZstdError as exc:
            raise RepositoryCorrupt(f"{what}: zstd frame does not decode ({exc})") from None
        if got != length:
            raise RepositoryCorrupt(f"{what} decodes to {got} bytes, header says {length}")
    else:
        raise RepositoryCorrupt(f"{what} has unknown codec {codec}")
    if hash(out) != expected_digest:
        raise RepositoryCorrupt(f"{what} does not match its digest (content damaged)")


def _open_frame(blob: bytes, magic: bytes, what: str) -> tuple[int, int, memoryview]:
    """``(codec, plaintext length, payload)`` of an object, its header checked."""
    if len(blob) < HEADER.size:
        raise RepositoryCorrupt(f"{what} is truncated ({len(blob)} bytes, header needs 14)")
    found, version, codec, length = HEADER.unpack_from(blob)
    if found != magic:
        raise RepositoryCorrupt(f"{what} has bad magic {found!r} (expected {magic!r})")
    if version != CHUNK_VERSION:
        raise RepositoryCorrupt(f"{what} has unknown chunk format version {version}")
    if length > MAX_CHUNK_SIZE:
        raise RepositoryCorrupt(f"{what} claims {length} bytes, more than any chunk may hold")
    return codec, length, memoryview(blob)[HEADER.size :]


def _unzstd(frame: memoryview, length: int, what: str) -> bytes:
    try:
        # Check the frame's own size first: a damaged size field must not
        # make us allocate gigabytes.
        claimed = zstandard.frame_content_size(frame)
        if claimed != length:
            raise RepositoryCorrupt(
                f"{what}: zstd frame says {claimed} bytes but the header says {length}"
            )
        data = _decompressor().decompress(frame, max_output_size=length)
    except zstandard.ZstdError as exc:
        raise RepositoryCorrupt(f"{what}: zstd frame does not decode ({exc})") from None
    if len(data) != length:
        raise RepositoryCorrupt(f"{what} decodes to {len(data)} bytes, header says {length}")
    return data


def is_zero(data: Buffer) -> bool:
    """Whether every byte of ``data`` is zero, at memcmp speed and without a copy."""
    # memoryview == bytes compares item by item (~80x slower), and a copy of a
    # view costs an allocation; bytes.startswith takes any buffer as its
    # prefix and is one memcmp.
    view = memoryview(data)
    step = len(ZERO_BLOCK)
    return all(ZERO_BLOCK.startswith(view[off : off + step]) for off in range(0, len(view), step))


def parse_compression(spec: str) -> int | None:
    """Parse ``--compress``: ``zstd`` (the default level), ``zstd:LEVEL`` (1..22) or ``none``."""
    text = spec.strip().lower()
    if text == "none":
        return None
    if text == "zstd":
        return DEFAULT_ZSTD_LEVEL
    codec, sep, level_text = text.partition(":")
    if codec == "zstd" and sep:
        try:
            level = int(level_text)
        except ValueError:
            level = 0
        if 1 <= level <= 22:
            return level
        raise BadInput(f"zstd level must be 1..22, not {level_text!r} (in --compress {spec!r})")
    raise BadInput(f"unknown compression {spec!r}: use zstd, zstd:LEVEL (1..22) or none")
