"""The passphrases of an encrypted repository: list, add, remove, export and import key objects.

Every ``keys/<id>`` object wraps the same master key under one passphrase
(:mod:`fleece.repo.format.crypto`). Changing a passphrase is adding a key under the
new one and removing the old one; nothing else in the repository changes,
so every point stays restorable. Key objects live on the store itself, in
clear (they hold nothing but the wrapped key and its KDF parameters: Argon2id,
or scrypt in keys made by earlier fleece).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from fleece.errors import BadInput, RepositoryError
from fleece.repo.backends.base import Backend, ObjectMissing
from fleece.repo.format import keys
from fleece.repo.format.crypto import (
    MAX_KEY_OBJECT,
    WrongPassphrase,
    config_auth,
    new_key_id,
    parse_key,
    unwrap_key,
    wrap_key,
)
from fleece.repo.format.point import iso_utc
from fleece.repo.object_lock import lock_clock
from fleece.repo.repository import Repository, read_config


@dataclass(frozen=True)
class KeyInfo:
    """One key object, for ``fleece key list``."""

    id: str
    created: str
    current: bool
    """Whether the passphrase given opened this one."""

    def as_dict(self) -> dict[str, object]:
        """The ``--json`` form."""
        return {"id": self.id, "created": self.created, "current": self.current}


def _require_encrypted(repo: Repository) -> None:
    if repo.master is None:
        raise BadInput(f"repository {repo.url} is not encrypted: it has no keys")


def list_keys(repo: Repository) -> list[KeyInfo]:
    """Every key object, oldest first."""
    _require_encrypted(repo)
    found = []
    for key in repo.raw_backend.list(keys.KEY_OBJECTS_PREFIX):
        try:
            # Read no more than a key object may hold: parse_key refuses a longer one.
            doc = parse_key(repo.raw_backend.get_range(key, 0, MAX_KEY_OBJECT + 1), f"key {key}")
        except ObjectMissing:
            continue
        found.append(KeyInfo(str(doc["id"]), str(doc.get("created", "")), doc["id"] == repo.key_id))
    return sorted(found, key=lambda k: (k.created, k.id))


def add_key(repo: Repository, passphrase: bytes) -> str:
    """Wrap the master key under another passphrase; the new key's id."""
    _require_encrypted(repo)
    assert repo.master is not None
    if not passphrase:
        raise BadInput("the new passphrase is empty")
    key_id = new_key_id()
    blob = wrap_key(repo.master, passphrase, key_id, iso_utc())
    if repo.lock is not None:  # locked like every object a point needs (fleece.repo.object_lock)
        repo.raw_backend.put_locked(keys.key_object_key(key_id), blob, repo.lock.retention(lock_clock()))
    else:
        repo.raw_backend.put(keys.key_object_key(key_id), blob, if_absent=True)
    return key_id


def remove_key(repo: Repository, key_id: str) -> None:
    """Remove one key object; the last one never goes (the repository would be lost)."""
    _require_encrypted(repo)
    ids = [k.id for k in list_keys(repo)]
    if key_id not in ids:
        raise BadInput(f"repository {repo.url} has no key {key_id!r} (see 'fleece key list')")
    if len(ids) == 1:
        raise BadInput(f"key {key_id} is the only key of {repo.url}: removing it would make every "
                       "point unreadable; add another first")
    repo.raw_backend.delete(keys.key_object_key(key_id))


def export_key(repo: Repository) -> bytes:
    """The key object the passphrase opened (still wrapped), for a paper or vault copy.

    These are the very bytes that opened the repository in this process, not
    the object fetched again: what the store holds now may have been replaced
    meanwhile by one this passphrase does not open.
    """
    _require_encrypted(repo)
    assert repo.master is not None
    if repo.master.key_object is None:
        raise RepositoryError(f"repository {repo.url} was not opened with a key object here (made or "
                              "opened with another repository's key); nothing was written")
    return repo.master.key_object


def import_key(backend: Backend, blob: bytes, passphrase: bytes) -> str:
    """Store an exported key object again, once it is shown to open this repository.

    Works on the store alone, so a repository whose every key was removed can
    be opened again from a paper or vault copy.
    """
    config = read_config(backend)
    if config.encryption == "none" or config.auth is None:
        raise BadInput(f"repository {backend.url} is not encrypted: it has no keys")
    doc = parse_key(blob, "the key file")
    master = unwrap_key(doc, passphrase)
    if master is None:
        raise WrongPassphrase("wrong passphrase for the key file; nothing was changed")
    # It must open *this* repository: its master key authenticates our config.
    if not secrets.compare_digest(config_auth(master, config.document()), config.auth):
        raise RepositoryError(f"the key file does not belong to repository {backend.url}; nothing "
                              "was changed")
    key_id = str(doc["id"])
    if not backend.put(keys.key_object_key(key_id), blob, if_absent=True):
        raise BadInput(f"repository {backend.url} has key {key_id} already; nothing was changed")
    return key_id
