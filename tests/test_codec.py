"""The chunk codec: framing, compression choice, corruption detection, zero test."""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import threading

import pytest

from fleece.errors import BadInput, RepositoryCorrupt
from fleece.repo.format.codec import (
    HEADER,
    ZERO_BLOCK,
    chunk_digest,
    decode_chunk,
    decode_chunk_into,
    digest_function,
    encode_chunk,
    encode_chunk_in_place,
    is_zero,
    parse_compression,
)

CHUNK = 64 * 1024


def header(blob: bytes) -> tuple[bytes, int, int, int]:
    magic, version, codec, length = struct.unpack_from("<4sBBQ", blob)
    return magic, version, codec, length


def test_digest_is_sha256_of_plaintext() -> None:
    data = b"guest data" * 1000
    assert chunk_digest(data) == hashlib.sha256(data).digest()
    assert len(chunk_digest(b"")) == 32


def test_compressible_chunk_is_stored_as_zstd() -> None:
    data = b"fleece " * 10000
    blob = encode_chunk(data, 3)
    assert header(blob) == (b"FLCK", 1, 1, len(data))
    assert len(blob) < len(data) // 10
    assert decode_chunk(blob, hashlib.sha256(data).digest()) == data


def test_incompressible_chunk_is_stored_plain() -> None:
    data = os.urandom(CHUNK)
    blob = encode_chunk(data, 19)
    assert header(blob) == (b"FLCK", 1, 0, CHUNK)
    assert blob[14:] == data
    assert decode_chunk(blob) == data


def test_level_none_stores_plain_even_when_compressible() -> None:
    data = bytes(CHUNK)
    blob = encode_chunk(data, None)
    assert header(blob)[2] == 0
    assert len(blob) == 14 + CHUNK
    assert decode_chunk(blob) == data


def test_accepts_bytearray_and_memoryview() -> None:
    data = bytearray(b"xyz" * 5000)
    assert decode_chunk(encode_chunk(memoryview(data), 1)) == bytes(data)
    assert decode_chunk(encode_chunk(data, None)) == bytes(data)


@pytest.mark.parametrize("compressible", [True, False])
def test_flipped_byte_anywhere_in_payload_is_detected(compressible: bool) -> None:
    data = (b"abcd" * (CHUNK // 4)) if compressible else os.urandom(CHUNK)
    blob = bytearray(encode_chunk(data, 3))
    digest = chunk_digest(data)
    for pos in (14, len(blob) // 2, len(blob) - 1):
        damaged = bytearray(blob)
        damaged[pos] ^= 0x01
        with pytest.raises(RepositoryCorrupt):
            decode_chunk(bytes(damaged), digest)


def test_wrong_digest_is_reported_with_the_name() -> None:
    blob = encode_chunk(b"one", None)
    wrong = chunk_digest(b"two")
    with pytest.raises(RepositoryCorrupt, match=wrong.hex()):
        decode_chunk(blob, wrong)


MALFORMED = [
    (b"FLCK\x01", "truncated"),
    (b"XXXX" + bytes([1, 0]) + struct.pack("<Q", 3) + b"abc", "magic"),
    (b"FLCK" + bytes([2, 0]) + struct.pack("<Q", 3) + b"abc", "version"),
    (b"FLCK" + bytes([1, 7]) + struct.pack("<Q", 3) + b"abc", "codec"),
    (b"FLCK" + bytes([1, 0]) + struct.pack("<Q", 4) + b"abc", "header says 4"),
    (b"FLCK" + bytes([1, 1]) + struct.pack("<Q", 1 << 40) + b"abc", "more than any chunk"),
]


@pytest.mark.parametrize(("blob", "reason"), MALFORMED)
def test_malformed_headers(blob: bytes, reason: str) -> None:
    with pytest.raises(RepositoryCorrupt, match=reason):
        decode_chunk(blob)


def test_zstd_frame_with_lying_length_is_refused() -> None:
    data = b"z" * 5000
    blob = bytearray(encode_chunk(data, 3))
    struct.pack_into("<Q", blob, 6, 4000)
    with pytest.raises(RepositoryCorrupt, match="4000"):
        decode_chunk(bytes(blob))


def test_concurrent_encode_decode_across_levels() -> None:
    """zstd contexts are per thread: many threads at several levels must not mix state."""
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for n in range(30):
                data = (f"{seed}-{n}-".encode() * 3000)[: CHUNK - n]
                level = (seed + n) % 5 + 1
                assert decode_chunk(encode_chunk(data, level), chunk_digest(data)) == data
        except BaseException as exc:  # collected for the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_is_zero() -> None:
    assert is_zero(bytes(CHUNK))
    assert is_zero(b"")
    assert is_zero(bytearray(100))
    assert is_zero(memoryview(bytes(4096))[:1000])
    tail_dirty = bytearray(CHUNK)
    tail_dirty[-1] = 1
    assert not is_zero(tail_dirty)
    assert not is_zero(memoryview(tail_dirty))
    assert not is_zero(b"\x00\x00\x01")
    # Many distinct lengths; and views longer than the zero block it compares with.
    for n in range(1, 40):
        assert is_zero(bytes(n))
        assert not is_zero(bytes(n - 1) + b"\x01")
    big = bytearray(3 * len(ZERO_BLOCK) + 5)
    assert is_zero(memoryview(big)[1:])
    big[2 * len(ZERO_BLOCK) + 3] = 9
    assert not is_zero(memoryview(big)[1:])
    assert is_zero(memoryview(big)[: 2 * len(ZERO_BLOCK)])


@pytest.mark.parametrize("level", [None, 3])
@pytest.mark.parametrize("content", ["random", "text"])
def test_a_chunk_encoded_in_its_frame_is_the_same_object(level: int | None, content: str) -> None:
    """The pipeline's no-copy encoding writes the header into the frame's room: same bytes."""
    data = os.urandom(CHUNK) if content == "random" else (b"fleece " * CHUNK)[:CHUNK]
    frame = mmap.mmap(-1, HEADER.size + CHUNK + 100)  # a frame may be longer (the disk's tail)
    frame[HEADER.size : HEADER.size + CHUNK] = data
    blob = encode_chunk_in_place(frame, CHUNK, level)
    assert bytes(blob) == encode_chunk(data, level)
    assert decode_chunk(bytes(blob), chunk_digest(data)) == data
    # Stored plain, the object is the frame itself, not a copy.
    assert isinstance(blob, memoryview) == (level is None or content == "random")


@pytest.mark.parametrize(
    ("spec", "level"),
    [("zstd", 1), ("zstd:3", 3), ("zstd:22", 22), ("ZSTD:7", 7), ("none", None)],
)
def test_parse_compression(spec: str, level: int | None) -> None:
    assert parse_compression(spec) == level


@pytest.mark.parametrize("spec", ["zstd:0", "zstd:23", "zstd:x", "zstd:", "gzip", "", "lz4:3"])
def test_parse_compression_rejects(spec: str) -> None:
    with pytest.raises(BadInput):
        parse_compression(spec)


# -- decode_chunk_into: the restore path decodes into its own buffer, with every check ----------

def _decode_into(blob: bytes, digest: bytes, length: int) -> bytes:
    out = memoryview(bytearray(length))
    decode_chunk_into(blob, out, digest, digest_function("sha256"), "chunk under test")
    return out.tobytes()


@pytest.mark.parametrize("level", [3, None])
def test_decode_into_gives_what_decode_gives(level: int | None) -> None:
    for data in (b"abcd" * (CHUNK // 4), os.urandom(CHUNK), bytes(CHUNK), b"tail" * 1000):
        blob = encode_chunk(data, level)
        assert _decode_into(blob, chunk_digest(data), len(data)) == decode_chunk(blob) == data


@pytest.mark.parametrize("compressible", [True, False])
def test_decode_into_detects_a_flipped_byte_anywhere(compressible: bool) -> None:
    data = (b"abcd" * (CHUNK // 4)) if compressible else os.urandom(CHUNK)
    blob = bytearray(encode_chunk(data, 3))
    for pos in (14, len(blob) // 2, len(blob) - 1):
        damaged = bytearray(blob)
        damaged[pos] ^= 0x01
        with pytest.raises(RepositoryCorrupt):
            _decode_into(bytes(damaged), chunk_digest(data), len(data))


@pytest.mark.parametrize(("blob", "reason"), MALFORMED)
def test_decode_into_refuses_malformed_headers(blob: bytes, reason: str) -> None:
    length = struct.unpack_from("<Q", blob, 6)[0] if len(blob) >= 14 else 3
    with pytest.raises(RepositoryCorrupt, match=reason):
        _decode_into(blob, chunk_digest(b"abc"), min(length, 16))


def test_decode_into_refuses_a_chunk_of_another_length_and_a_lying_frame() -> None:
    data = b"z" * 5000
    blob = encode_chunk(data, 3)
    with pytest.raises(RepositoryCorrupt, match="holds 5000 bytes, expected 4096"):
        _decode_into(blob, chunk_digest(data), 4096)
    lying = bytearray(blob)
    struct.pack_into("<Q", lying, 6, 4000)
    with pytest.raises(RepositoryCorrupt, match="zstd frame says 5000"):
        _decode_into(bytes(lying), chunk_digest(data), 4000)
