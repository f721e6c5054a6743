"""A repository made with nothing specified is the same whoever makes it: the CLI, a config file,
or the Python API (every one of them takes its defaults from ``fleece.repo.format.defaults``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleece.backup.job import BackupRequest
from fleece.backup.pipeline import PipelineSettings
from fleece.errors import BadInput
from fleece.repo.backends.file import FileBackend
from fleece.repo.format.codec import parse_compression
from fleece.repo.format.defaults import DEFAULT_CHUNK_SIZE, DEFAULT_COMPRESS, DEFAULT_HASH, DEFAULT_ZSTD_LEVEL
from fleece.repo.repository import InitSettings, Repository, read_config


def settings(location: Path) -> tuple[int, int | None, str, str]:
    c = read_config(FileBackend(location))
    return c.chunk_size, c.compression_level, c.hash, c.encryption


DEFAULTS = (DEFAULT_CHUNK_SIZE, DEFAULT_ZSTD_LEVEL, DEFAULT_HASH, "none")


def test_the_library_defaults_are_the_defaults() -> None:
    assert parse_compression(DEFAULT_COMPRESS) == parse_compression("zstd") == DEFAULT_ZSTD_LEVEL
    request = BackupRequest(qmp="", drives=[], repo=lambda: Repository.init(FileBackend(Path("/x"))))
    assert request.compression_level == DEFAULT_ZSTD_LEVEL
    assert PipelineSettings().compression_level == DEFAULT_ZSTD_LEVEL


def test_an_encrypted_init_checks_the_zstd_level_like_a_plain_one(tmp_path: Path) -> None:
    for encryption in ("none", "aes-256-gcm"):
        with pytest.raises(BadInput, match=r"zstd level must be 1\.\.22"):
            Repository.init(FileBackend(tmp_path / encryption), compression_level=23,
                            encryption=encryption, passphrase=b"secret")
        assert not (tmp_path / encryption).exists() or not any((tmp_path / encryption).iterdir())


@pytest.mark.qemu
def test_cli_config_file_and_library_make_the_same_repository(
        make_vm: Any, fleece: Any, tmp_path: Path) -> None:
    Repository.init(FileBackend(tmp_path / "init-api"))
    Repository.open_or_init(FileBackend(tmp_path / "open-or-init-api"), InitSettings())
    res = fleece("init", "--repo", tmp_path / "init-cli", "--encryption", "none")
    assert res.rc == 0, res.err
    vm = make_vm([("qcow2", "16M")])
    vm.write("vda", 0, 64 * 1024, 0x5A)
    res = fleece("backup", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", tmp_path / "backup-cli")
    assert res.rc == 0, res.err
    config = tmp_path / "vm.toml"
    config.write_text(f'qmp = "{vm.qmp_path}"\ndrives = ["vda"]\nrepo = "{tmp_path / "backup-config"}"\n')
    res = fleece("backup", "--config", config)
    assert res.rc == 0, res.err
    made = {name: settings(tmp_path / name)
            for name in ("init-api", "open-or-init-api", "init-cli", "backup-cli", "backup-config")}
    assert made == dict.fromkeys(made, DEFAULTS)
