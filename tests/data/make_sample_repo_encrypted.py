"""Write tests/data/sample-repo-encrypted-v<N>: a tiny encrypted repository in envelope version N.

Run once per envelope version, when that version is introduced
(``.venv/bin/python tests/data/make_sample_repo_encrypted.py --force``), never
to "fix" a failing test: the checked-in bytes are what the fleece of that day
wrote, and later versions must still open them. The target is named after the
envelope version this fleece writes, so an older sample is never overwritten.
Keys, salts and nonces are random (there is no deterministic mode to leave in
the code); everything else is fixed.

Contents: format 2, VM ``web3``, chunk size 64 KiB, sha256 (keyed), zstd
level 3, passphrase in ``sample-repo-encrypted-v<N>.passphrase`` next to it.
- point 1 (full): ``vda`` (256 KiB) = [A, zero, B, A]
- point 2 (incremental on 1): chunk 1 gets the delta {4096: E} over its zero
  base and chunk 2 the delta {0: 0xEE * 100, 65436: 0x11 * 100} over B, both
  in one pack; chunk 3 is rewritten whole as C.
A, B, C and E are those of tests/data/make_sample_repo_v2.py.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from make_sample_repo import CHUNK, A, B, C
from make_sample_repo_v2 import D1, D2, record

from fleece.repo.backends.file import FileBackend
from fleece.repo.format import crypto
from fleece.repo.format.codec import encode_chunk
from fleece.repo.format.delta import PackWriter, encode_delta, encode_delta_body
from fleece.repo.format.index import ChunkIndex
from fleece.repo.format.point import DiskRecord, RestorePoint
from fleece.repo.repository import Repository

HERE = Path(__file__).resolve().parent
CIPHER = {1: "aes-256-gcm", 2: "chacha20-poly1305"}
"""The cipher each envelope version's sample uses (both ciphers are covered between them)."""
P1 = "20261201T010203.000001Z-ee0001"
P2 = "20261202T010203.000002Z-ee0002"


def envelope_version() -> int:
    """The envelope version this fleece seals new objects in (version 1 was crypto's constant)."""
    try:
        from fleece.repo.format import envelope
    except ImportError:
        return int(crypto.ENVELOPE_VERSION)  # type: ignore[attr-defined]
    return envelope.WRITE_VERSION


def main() -> None:
    """Regenerate the sample of the envelope version this fleece writes."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--force", action="store_true", help="replace an existing sample")
    args = ap.parse_args()
    version = envelope_version()
    target = HERE / f"sample-repo-encrypted-v{version}"
    passphrase_file = HERE / f"sample-repo-encrypted-v{version}.passphrase"
    if target.exists():
        if not args.force:
            raise SystemExit(f"{target} exists; pass --force to regenerate it")
        shutil.rmtree(target)
    passphrase = f"fleece sample passphrase, envelope {version}"
    passphrase_file.write_text(passphrase + "\n")
    passphrase_file.chmod(0o600)
    repo = Repository.init(FileBackend(target), chunk_size=CHUNK, compression_level=3,
                           repository_id=f"e{version}" + "0" * 30, hash="sha256", format=2,
                           encryption=CIPHER[version], passphrase=passphrase.encode())
    index = ChunkIndex.empty(CHUNK, 4 * CHUNK, repo.index_version)
    index.set(0, store(repo, A))
    index.set(2, store(repo, B))
    index.set(3, store(repo, A))
    repo.write_point(point(P1, "2026-12-01T01:02:03.000001Z", None, record(repo, P1, index, "full")))
    index = index.copy()
    pack(repo, [(1, D1), (2, D2)], index)
    index.set(3, store(repo, C))
    repo.write_point(point(P2, "2026-12-02T01:02:03.000002Z", P1, record(repo, P2, index, "incremental")))
    print(f"wrote {target} (passphrase in {passphrase_file})")


def store(repo: Repository, data: bytes) -> bytes:
    """Store ``data`` as a chunk under the repository's keyed name; that name."""
    digest = repo.digest(data)
    repo.put_chunk(digest, encode_chunk(data, 3))
    repo.flush()
    return digest


def pack(repo: Repository, deltas: list[tuple[int, list[tuple[int, bytes]]]], index: ChunkIndex) -> None:
    """Store ``(position, [(offset, bytes)])`` deltas in one pack (keyed digests), added to ``index``."""
    writer = PackWriter(repo.put_pack)
    for position, extents in deltas:
        body = encode_delta_body([(off, len(b)) for off, b in extents], b"".join(b for _, b in extents))
        writer.add(position, encode_delta(body, 3), sum(len(b) for _, b in extents), repo.digest(body))
    for position, ref in writer.close():
        index.add_delta(position, ref)


def point(point_id: str, created: str, parent: str | None, disk: DiskRecord) -> RestorePoint:
    return RestorePoint(id=point_id, vm="web3", created=created, parent=parent, chunk_size=CHUNK,
                        disks=[disk], fleece_version="0.2.0", qemu_version="7.2.0", labels={},
                        stats={})


if __name__ == "__main__":
    main()
