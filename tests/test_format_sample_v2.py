"""The checked-in sample of repository format 2 (deltas in packs) must keep reading back exactly.

As for format 1 (tests/test_format_sample.py), the expectations are written
from docs/format.md by hand — struct layouts, sha256 of known plaintexts, the
deltas applied by hand — not computed by fleece, so a change to any byte
layout, key name or checksum rule fails here. Never regenerate the sample to
make this pass.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import zstandard

from fleece.cli import main

SAMPLE = Path(__file__).parent / "data" / "sample-repo-v2"
CHUNK = 64 * 1024
A = b"\x55" * CHUNK
B = hashlib.shake_256(b"fleece sample chunk B").digest(CHUNK)
C = b"fleece!\n" * (CHUNK // 8)
E = b"delta!\n\0" * 1024
Z = bytes(CHUNK)
P1 = "20261125T010203.000001Z-aa0001"
P2 = "20261126T010203.000002Z-aa0002"
P3 = "20261127T010203.000003Z-aa0003"


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def patched(base: bytes, *extents: tuple[int, bytes]) -> bytes:
    out = bytearray(base)
    for off, data in extents:
        out[off : off + len(data)] = data
    return bytes(out)


# What each point's vda holds, from the sample's description alone.
CHUNK1 = patched(Z, (4096, E))
CHUNK2_P2 = patched(B, (0, b"\xee" * 100), (CHUNK - 100, b"\x11" * 100))
CHUNK2_P3 = patched(CHUNK2_P2, (50, b"\x22" * 100))
EXPECTED = {P1: A + Z + B + A, P2: A + CHUNK1 + CHUNK2_P2 + A, P3: A + CHUNK1 + CHUNK2_P3 + C}


def delta_body(*extents: tuple[int, bytes]) -> bytes:
    return (struct.pack("<I", len(extents)) + b"".join(struct.pack("<II", o, len(d)) for o, d in extents)
            + b"".join(d for _, d in extents))


D1 = delta_body((4096, E))
D2 = delta_body((0, b"\xee" * 100), (CHUNK - 100, b"\x11" * 100))
D3 = delta_body((50, b"\x22" * 100))


def test_config_says_format_2() -> None:
    doc = json.loads((SAMPLE / "config").read_bytes())
    assert doc["format"] == 2 and doc["hash"] == "sha256" and doc["chunk_size"] == CHUNK


def test_sample_holds_chunks_two_packs_three_indexes_three_points() -> None:
    files = {p.relative_to(SAMPLE).as_posix() for p in SAMPLE.rglob("*") if p.is_file()}
    chunks = {f"chunks/{sha(x).hex()[:2]}/{sha(x).hex()}" for x in (A, B, C)}
    packs = {f for f in files if f.startswith("packs/")}
    assert len(packs) == 2
    assert files == chunks | packs | {"config", *(f"indexes/{p}/vda" for p in (P1, P2, P3)),
                                      *(f"points/web2/{p}.json" for p in (P1, P2, P3))}
    for key in packs:  # named by the sha256 of their bytes
        assert key.rsplit("/", 1)[1] == sha((SAMPLE / key).read_bytes()).hex()


def parse_index_v2(blob: bytes) -> tuple[list[tuple[bytes, list[tuple[bytes, int, int, int, bytes]]]], int]:
    """The layout of docs/format.md, "Index version 2", decoded by hand."""
    assert blob[-32:] == sha(blob[:-32])
    magic, version, chunk_size, disk_size, count, n_refs = struct.unpack_from("<4sB3xIQQQ", blob)
    assert (magic, version, chunk_size) == (b"FLIX", 2, CHUNK)
    refs_at = 36 + 40 * count
    assert len(blob) == refs_at + 80 * n_refs + 32
    entries = []
    for i in range(count):
        base, first, n, reserved = struct.unpack_from("<32sIHH", blob, 36 + 40 * i)
        assert reserved == 0
        refs = [struct.unpack_from("<32sQII32s", blob, refs_at + 80 * (first + k)) for k in range(n)]
        entries.append((base, refs))
    return entries, disk_size


def test_index_v2_layout_and_deltas_by_hand() -> None:
    entries, size = parse_index_v2((SAMPLE / f"indexes/{P3}/vda").read_bytes())
    assert size == 4 * CHUNK
    assert [base for base, _ in entries] == [sha(A), bytes(32), sha(B), sha(C)]
    assert [len(refs) for _, refs in entries] == [0, 1, 2, 0]
    (d1,) = entries[1][1]
    d2, d3 = entries[2][1]
    assert [r[4] for r in (d1, d2, d3)] == [sha(D1), sha(D2), sha(D3)]  # delta digests
    assert [r[3] for r in (d1, d2, d3)] == [len(E), 200, 100]  # bytes covered
    assert d1[0] == d2[0] != d3[0]  # d1 and d2 share point 2's pack; d3 is in point 3's
    for pack, offset, length, _, digest in (d1, d2, d3):
        blob = (SAMPLE / f"packs/{pack.hex()[:2]}/{pack.hex()}").read_bytes()
        encoded = blob[offset : offset + length]
        magic, version, codec, plain_len = struct.unpack_from("<4sBBQ", encoded)
        assert (magic, version) == (b"FLDT", 1)
        body = encoded[14:] if codec == 0 else zstandard.ZstdDecompressor().decompress(encoded[14:])
        assert len(body) == plain_len and sha(body) == digest


def test_pack_layout_by_hand() -> None:
    for path in (SAMPLE / "packs").rglob("*"):
        if not path.is_file():
            continue
        blob = path.read_bytes()
        assert blob[:5] == b"FLPK\x01" and blob[5:16] == bytes(11)
        n, reserved, table_sha = struct.unpack_from("<II32s", blob, len(blob) - 40)
        table = blob[len(blob) - 40 - 48 * n : len(blob) - 40]
        assert reserved == 0 and sha(table) == table_sha
        rows = [struct.unpack_from("<QII32s", table, 48 * k) for k in range(n)]
        assert all(kind == 1 for _, _, kind, _ in rows)
        assert rows[0][0] == 16  # the first delta follows the header


@pytest.mark.parametrize("point", [P1, P2, P3])
def test_every_point_restores_to_what_the_description_says(point: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(SAMPLE, repo)  # never touch the checked-in bytes
    out = tmp_path / "vda.raw"
    assert main(["restore", "--repo", str(repo), point, "--drive", "vda", "-o", str(out)]) == 0
    assert out.read_bytes() == EXPECTED[point]


def test_list_and_deep_verify_read_the_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(SAMPLE, repo)
    assert main(["verify", "--repo", str(repo), "--deep", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and [p["id"] for p in report["points"]] == [P1, P2, P3]
    assert main(["list", "--repo", str(repo), "--json"]) == 0
    assert P3 in capsys.readouterr().out
