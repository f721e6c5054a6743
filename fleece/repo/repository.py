"""The repository: config, chunks, chunk indexes and restore points over a backend.

This is the only module that knows where objects live and how they are
checked on the way in and out; the layout itself is in :mod:`fleece.repo.format.keys`
and docs/format.md. Locking is separate (:mod:`fleece.repo.lock`): callers
that write points hold the VM's lock.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from fleece.errors import (
    BadInput,
    NotARepository,
    RepositoryChanged,
    RepositoryCorrupt,
    RepositoryError,
    RepositoryExists,
)
from fleece.repo.backends.base import Backend, ObjectMissing, Retention
from fleece.repo.backends.store_check import STORE_PREFIX
from fleece.repo.format import keys
from fleece.repo.format.codec import (
    HASHES,
    MAX_CHUNK_SIZE,
    decode_chunk,
    decode_chunk_into,
    digest_function,
    sparse_digest_function,
)
from fleece.repo.format.crypto import (
    CIPHERS,
    MasterKey,
    Sealer,
    WrongPassphrase,
    config_auth,
    new_key_id,
    parse_key,
    unwrap_key,
    wrap_key,
)
from fleece.repo.format.defaults import DEFAULT_CHUNK_SIZE, DEFAULT_HASH, DEFAULT_ZSTD_LEVEL
from fleece.repo.format.delta import DeltaRef, apply_delta, decode_delta
from fleece.repo.format.index import (
    INDEX_VERSION,
    INDEX_VERSION_DELTAS,
    INDEX_VERSION_PAGED,
    ZERO_MARKER,
    ChunkIndex,
)
from fleece.repo.format.point import RestorePoint, iso_utc
from fleece.repo.object_lock import LockLedger, ObjectLock, lock_clock
from fleece.testing import Phase, pause_point

if TYPE_CHECKING:
    from fleece.repo.backends.encrypted import EncryptedBackend
    from fleece.repo.local_state import LocalState, RepositoryMemory

Passphrase = Callable[[], bytes]
"""Where an encrypted repository's passphrase comes from; called only when one is needed."""

REPO_FORMAT = 3
"""What new repositories are: format 2 adds sub-chunk deltas in packs, format 3 paged indexes
whose incrementals write only the pages they touch (docs/format.md)."""
READABLE_FORMATS = (1, 2, 3)
MIN_CHUNK_SIZE = 64 * 1024


def check_chunk_size(chunk_size: int) -> int:
    """Return ``chunk_size`` if format 1 allows it (a power of two, 64 KiB to 16 MiB)."""
    if not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE) or chunk_size & (chunk_size - 1):
        raise BadInput(
            f"chunk size {chunk_size} is not a power of two between 64 KiB and 16 MiB"
        )
    return chunk_size


def _check_settings(chunk_size: int, compression_level: int | None, hash: str) -> None:
    """A new repository's settings, checked before anything is written (``BadInput``)."""
    check_chunk_size(chunk_size)
    digest_function(hash)  # BadInput for an unknown name
    if compression_level is not None and not 1 <= compression_level <= 22:
        raise BadInput(f"zstd level must be 1..22, not {compression_level}")


@dataclass(frozen=True)
class RepositoryConfig:
    """The ``config`` object: fixed when the repository is created."""

    id: str
    chunk_size: int
    compression_level: int | None
    """zstd level for new chunks, or None to store them uncompressed."""
    hash: str
    """The content hash that names chunks (:data:`~fleece.repo.format.codec.HASHES`)."""
    encryption: str = "none"
    """``none`` or the AEAD that seals every object (docs/format.md, "Encryption")."""
    format: int = REPO_FORMAT
    auth: str | None = None
    """Encrypted repositories: the MAC binding this config to the master key."""
    object_lock: ObjectLock | None = None
    """Immutable restore points (S3 Object Lock), or None (docs/format.md ``config``)."""

    def document(self) -> dict[str, object]:
        """The ``config`` object as JSON data."""
        codec = "none" if self.compression_level is None else "zstd"
        doc: dict[str, object] = {
            "format": self.format,
            "id": self.id,
            "chunk_size": self.chunk_size,
            "hash": self.hash,
            "compression": {"codec": codec, "level": self.compression_level},
            "encryption": self.encryption,
        }
        if self.object_lock is not None:
            doc["object_lock"] = self.object_lock.document()
        if self.auth is not None:
            doc["auth"] = self.auth
        return doc

    def to_json(self) -> bytes:
        """The ``config`` object's bytes."""
        return json.dumps(self.document(), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, blob: bytes, url: str) -> RepositoryConfig:
        """Parse and validate ``config``; refuses what this fleece cannot read."""
        try:
            doc = json.loads(blob)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RepositoryCorrupt(f"{url}: config is not valid JSON") from None
        if not isinstance(doc, dict):
            raise RepositoryCorrupt(f"{url}: config is not a JSON object")
        if doc.get("format") not in READABLE_FORMATS:
            raise RepositoryError(
                f"{url} has repository format {doc.get('format')!r}; this fleece reads "
                f"formats {' and '.join(map(str, READABLE_FORMATS))} (upgrade fleece); "
                "nothing was changed"
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
                format=int(doc["format"]),
                auth=None if doc.get("auth") is None else str(doc["auth"]),
                object_lock=(None if doc.get("object_lock") is None
                             else ObjectLock.from_document(doc["object_lock"], url)),
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
        if config.encryption != "none" and (config.format < 2 or config.auth is None):
            raise RepositoryCorrupt(f"{url}: config says {config.encryption} but is not format 2 "
                                    "with an auth member")
        if config.hash not in HASHES or (config.encryption != "none"
                                         and config.encryption not in CIPHERS):
            raise RepositoryError(
                f"{url} uses hash {config.hash!r} / encryption {config.encryption!r}, which "
                "this fleece does not support (upgrade fleece)"
            )
        return config


@dataclass(frozen=True)
class InitSettings:
    """How a repository is created: ``fleece init``, ``backup --init``, ``copy --init`` (and an
    ``[init]`` table in ``--config``)."""

    encryption: str = "none"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    compression_level: int | None = DEFAULT_ZSTD_LEVEL
    hash: str = DEFAULT_HASH
    object_lock: ObjectLock | None = None


def holds_objects(backend: Backend) -> bool:
    """Whether the location holds anything but the store check's own objects.

    Another host's store check (``store/``) may run while this one decides
    whether to create a repository there; that is not "someone's data".
    """
    return any(not key.startswith(STORE_PREFIX) for key in backend.list(""))


class Repository:
    """A fleece repository on a backend. Use :meth:`open`, :meth:`init` or :meth:`open_or_init`."""

    def __init__(self, backend: Backend, config: RepositoryConfig, *,
                 sealer: Sealer | None = None, raw_backend: Backend | None = None,
                 master: MasterKey | None = None, key_id: str | None = None) -> None:
        self.backend = backend
        """Where every object goes: the store itself, or (encrypted) the sealing wrapper on it."""
        self.raw_backend = raw_backend or backend
        """The store itself: ``config`` and ``keys/`` live here, in clear."""
        self.config = config
        self.url = backend.url
        self.master = master
        self.key_id = key_id
        """The key object the passphrase opened (encrypted repositories)."""
        self.sealed: EncryptedBackend | None = None
        """Encrypted repositories: the sealing wrapper (``backend``), for moving sealed objects as
        they are."""
        self.digest = digest_function(config.hash, sealer.id_key if sealer else None)
        """This repository's hash (its ``config``'s ``hash``; keyed when encrypted): names packs,
        pages and deltas, and chunks up to format 2."""
        self.chunk_name = (sparse_digest_function(config.hash, sealer.id_key if sealer else None)
                           if config.format >= 3 else self.digest)
        """What names a chunk: format 3 hashes its canonical sparse form (holes cost nothing),
        older formats its plaintext (docs/format.md "Chunks")."""
        self.index_version = (INDEX_VERSION_PAGED if config.format >= 3 else
                              INDEX_VERSION_DELTAS if config.format >= 2 else INDEX_VERSION)
        """The index version this repository's writers use (deltas from format 2, pages from 3)."""
        self.lock = config.object_lock
        """How objects are locked (``fleece init --object-lock-days``), or None."""
        self.lock_ledger = LockLedger()
        """The locks of the objects this process wrote, probed or extended."""
        self.memory: RepositoryMemory | None = None
        """What this host saw of the repository (:mod:`fleece.repo.local_state`), when opened with it:
        listings are checked against it and committed points recorded."""

    def remember(self, state: LocalState, accept_change: bool = False) -> Repository:
        """Check this repository against ``state`` (:class:`~fleece.errors.RepositoryChanged`) and
        record it there; from now on its point listings are checked and its new points recorded."""
        self.memory = state.open_repository(self.url, self.config.id, self.config.encryption,
                                            self.config.auth, accept_change=accept_change)
        self.memory.note_key(self.key_id)
        return self

    @property
    def has_deltas(self) -> bool:
        """Whether incrementals may store sub-chunk deltas here (format 2)."""
        return self.config.format >= 2

    # -- creating and opening -----------------------------------------------

    @classmethod
    def init(
        cls,
        backend: Backend,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        compression_level: int | None = DEFAULT_ZSTD_LEVEL,
        repository_id: str | None = None,
        hash: str = DEFAULT_HASH,
        format: int = REPO_FORMAT,
        encryption: str = "none",
        passphrase: bytes | None = None,
        object_lock: ObjectLock | None = None,
    ) -> Repository:
        """Create a repository at an empty location (``BadInput`` if it is one already).

        With ``encryption`` (a cipher of :data:`~fleece.repo.crypto.CIPHERS`) a
        master key is made and stored wrapped under ``passphrase``. ``format``
        1 is only for tests that need a repository as older fleece wrote it.
        With ``object_lock`` the store must lock objects (checked before
        anything is written) and ``config`` and the key are locked too.
        """
        if encryption == "none" and passphrase is not None:
            raise plaintext_refused(backend.url, "create")
        if object_lock is not None:
            backend.check_object_lock()
        if encryption != "none":
            return cls._init_encrypted(backend, chunk_size, compression_level, repository_id, hash,
                                       encryption, passphrase, object_lock)
        _check_settings(chunk_size, compression_level, hash)
        config = RepositoryConfig(
            id=repository_id or secrets.token_hex(16),
            chunk_size=chunk_size,
            compression_level=compression_level,
            hash=hash,
            format=format,
            object_lock=object_lock,
        )
        if not _create(backend, keys.CONFIG_KEY, config.to_json(), object_lock):
            raise RepositoryExists(f"{backend.url} already holds a fleece repository; nothing was changed")
        return cls(backend, config)

    @classmethod
    def _init_encrypted(cls, backend: Backend, chunk_size: int, compression_level: int | None,
                        repository_id: str | None, hash: str, encryption: str,
                        passphrase: bytes | None, object_lock: ObjectLock | None) -> Repository:
        if encryption not in CIPHERS:
            raise BadInput(f"unknown encryption {encryption!r} (choose from {', '.join(CIPHERS)}, none)")
        if not passphrase:
            raise BadInput("an encrypted repository needs a passphrase: FLEECE_PASSPHRASE, "
                           "--passphrase-file or FLEECE_PASSPHRASE_COMMAND")
        _check_settings(chunk_size, compression_level, hash)
        if next(iter(backend.list("")), None) is not None:
            raise BadInput(f"{backend.url} is not empty; an encrypted repository is made in an "
                           "empty location; nothing was changed")
        master = MasterKey.generate()
        config = RepositoryConfig(id=repository_id or secrets.token_hex(16), chunk_size=chunk_size,
                                  compression_level=compression_level, hash=hash,
                                  encryption=encryption, object_lock=object_lock)
        config = RepositoryConfig(**{**config.__dict__, "auth": config_auth(master, config.document())})
        key_id = new_key_id()
        _create(backend, keys.key_object_key(key_id), wrap_key(master, passphrase, key_id, iso_utc()),
                object_lock)
        if not _create(backend, keys.CONFIG_KEY, config.to_json(), object_lock):
            backend.delete(keys.key_object_key(key_id))
            raise RepositoryExists(f"{backend.url} already holds a fleece repository; nothing was changed")
        return cls._unlocked(backend, config, master, key_id)

    @classmethod
    def init_sharing_key(cls, backend: Backend, source: Repository,
                         object_lock: ObjectLock | None = None) -> Repository:
        """Create an encrypted repository at an empty location with ``source``'s master key.

        Its settings are the source's (new id; ``object_lock`` as given, for
        ``fleece copy`` passes the source's unless told otherwise), and every
        key object of the source is stored there too, so the same passphrases
        open both. Chunks, packs and name tokens then agree between the two,
        and sealed objects can move from one to the other as they are.
        """
        if source.master is None:
            raise BadInput(f"{source.url} is not encrypted: it has no key to share")
        if object_lock is not None:
            backend.check_object_lock()
        c = source.config
        config = RepositoryConfig(id=secrets.token_hex(16), chunk_size=c.chunk_size,
                                  compression_level=c.compression_level, hash=c.hash,
                                  encryption=c.encryption, object_lock=object_lock)
        config = RepositoryConfig(**{**config.__dict__,
                                     "auth": config_auth(source.master, config.document())})
        # Key objects first, config last (as init does): a location with keys and no config
        # is no repository yet. Identical keys a racing creator stored are left alone.
        for key in sorted(source.raw_backend.list(keys.KEY_OBJECTS_PREFIX)):
            _create(backend, key, source.raw_backend.get(key), object_lock)
        if not _create(backend, keys.CONFIG_KEY, config.to_json(), object_lock):
            raise RepositoryExists(f"{backend.url} already holds a fleece repository; nothing was changed")
        return cls._unlocked(backend, config, source.master, source.key_id)

    def shares_key(self, config: RepositoryConfig) -> bool:
        """Whether this (encrypted) repository's master key also authenticates ``config``.

        Then the other repository was made with the same master key (by
        :meth:`init_sharing_key`): its chunk names, name tokens and seals are
        this one's, and it opens with this repository's key, no passphrase asked.
        """
        return (self.master is not None and config.auth is not None
                and config.encryption == self.config.encryption
                and secrets.compare_digest(config_auth(self.master, config.document()), config.auth))

    @classmethod
    def open_with_key_of(cls, backend: Backend, config: RepositoryConfig, other: Repository) -> Repository:
        """Open the repository ``config`` describes with ``other``'s master key (see :meth:`shares_key`)."""
        if other.master is None or not other.shares_key(config):
            raise RepositoryError(f"{backend.url} does not share the key of {other.url}")
        return cls._unlocked(backend, config, other.master, None)

    def stored_key(self, key: str) -> str:
        """Where the object with logical ``key`` lies on the store (names as tokens when encrypted)."""
        return key if self.sealed is None else self.sealed.stored_key(key)

    @classmethod
    def _unlocked(cls, backend: Backend, config: RepositoryConfig, master: MasterKey,
                  key_id: str | None) -> Repository:
        from fleece.repo.backends.encrypted import EncryptedBackend

        sealer = Sealer(master, config.encryption)
        sealed = EncryptedBackend(backend, sealer)
        repo = cls(sealed, config, sealer=sealer, raw_backend=backend, master=master, key_id=key_id)
        repo.sealed = sealed
        return repo

    @classmethod
    def open(cls, backend: Backend, passphrase: Passphrase | None = None, *,
             state: LocalState | None = None, accept_change: bool = False) -> Repository:
        """Open an existing repository; ``BadInput`` if ``backend`` holds none.

        An encrypted one needs ``passphrase``: without it, or when no key object
        opens with it, a :class:`RepositoryError` says so (exit 1) and nothing
        is read beyond ``config`` and ``keys/``. Fails closed: with a
        ``passphrase`` given, a repository whose ``config`` says it is not
        encrypted is refused (``BadInput``), for whoever can write to the store
        can replace ``config``. With ``state`` the repository is checked
        against what this host saw of it before its key is even tried
        (:meth:`remember`).
        """
        config = read_config(backend)
        if config.encryption == "none" and passphrase is not None:
            raise plaintext_refused(backend.url, "open")
        if state is not None:
            # Before unlocking: a repository that lost its encryption is refused without a passphrase too.
            state.check(backend.url, config.id, config.encryption, config.auth,
                        accept_change=accept_change)
        if config.object_lock is not None:
            # Also makes the store delete whole objects (every version) from now on.
            backend.check_object_lock()
        if config.encryption == "none":
            repo = cls(backend, config)
        elif passphrase is None:
            raise RepositoryError(
                f"repository {backend.url} is encrypted: give its passphrase with FLEECE_PASSPHRASE, "
                "--passphrase-file or FLEECE_PASSPHRASE_COMMAND; nothing was changed")
        else:
            master, key_id = unlock(backend, config, passphrase())
            repo = cls._unlocked(backend, config, master, key_id)
        return repo if state is None else repo.remember(state, accept_change)

    @classmethod
    def open_or_init(cls, backend: Backend, settings: InitSettings, passphrase: Passphrase | None = None,
                     *, state: LocalState | None = None, accept_change: bool = False) -> Repository:
        """Open the repository, or create it with ``settings`` where the location holds no objects.

        Only for a caller that was told to create one (``--init``): a location
        holding anything else is refused, so that a typo in ``--repo`` never
        scatters chunks over someone's directory, and with ``state`` a location
        this host knew to hold a repository is refused too (a store that hides
        everything is not an empty location). ``passphrase`` is required by
        an encrypted ``settings`` and refused by a plain one (fail closed).
        """
        try:
            return cls.open(backend, passphrase, state=state, accept_change=accept_change)
        except NotARepository:
            if holds_objects(backend):
                # Another process may have created it since our look: open
                # again; still no config means the objects are not ours.
                return cls.open(backend, passphrase, state=state, accept_change=accept_change)
        if state is not None and not accept_change:
            try:
                state.check_location_empty(backend.url)
            except RepositoryChanged:
                # Another run on this host may have made it since our look (and recorded it).
                try:
                    return cls.open(backend, passphrase, state=state)
                except NotARepository:
                    raise RepositoryChanged(
                        f"{backend.url} held a repository when this host last used it and now holds "
                        "none (deleted, or the store hides it): not creating another there; "
                        "nothing was written; if the change was deliberate, run again with "
                        "--accept-change") from None
        try:
            repo = cls.init(backend, settings.chunk_size, settings.compression_level,
                            hash=settings.hash, encryption=settings.encryption,
                            passphrase=None if passphrase is None else passphrase(),
                            object_lock=settings.object_lock)
        except RepositoryExists:
            # Another process initialized it between our look and our put.
            return cls.open(backend, passphrase, state=state, accept_change=accept_change)
        return repo if state is None else repo.remember(state, accept_change=True)

    # -- chunks -------------------------------------------------------------

    @staticmethod
    def chunk_key(digest: bytes) -> str:
        """``chunks/<2 hex>/<64 hex>``."""
        return keys.chunk_key(digest)

    def put_chunk(self, digest: bytes, blob: bytes | memoryview) -> bool:
        """Store an encoded chunk unless it is there already; False when it was (no write).

        This is the dedup probe for chunks no index names: one existence check
        (a stat, or a HEAD on S3 — cheaper than uploading the bytes again),
        then a conditional create, so two writers racing for one chunk are
        both fine (chunks are immutable). Backends that batch durability
        (``stage``/``flush``, the file backend) publish the chunk only at the
        next :meth:`flush`; the restore point is never written before that.
        """
        key = keys.chunk_key(digest)
        if self.lock is not None:
            data = blob if isinstance(blob, bytes) else bytes(blob)
            stored = self.put_immutable(key, data, probe=True)
            pause_point(Phase.CHUNK_STORED)
            return stored
        if self.backend.exists(key):
            return False
        stored = self.backend.stage(key, blob)
        pause_point(Phase.CHUNK_STORED)
        return stored

    def flush(self) -> None:
        """Make every chunk stored so far durable and visible (a no-op where puts already are)."""
        self.backend.flush()

    def discard_staged(self) -> None:
        """Drop chunks staged by a backup that failed before :meth:`flush`."""
        self.backend.discard_staged()

    def get_chunk(self, digest: bytes) -> bytes:
        """The plaintext of chunk ``digest``, verified; ``RepositoryCorrupt`` if missing or damaged."""
        key = keys.chunk_key(digest)
        try:
            blob = self.backend.get(key)
        except ObjectMissing:
            raise RepositoryCorrupt(f"chunk {key} is missing from {self.url}") from None
        return decode_chunk(blob, digest, self.chunk_name)

    def create(self, key: str, blob: bytes, *, existing_ok: bool = True) -> bool:
        """A conditional create of an immutable object; False when ``key`` existed.

        In an Object Lock repository the object is locked (and an existing
        one's lock kept ahead unless ``existing_ok`` is False):
        :meth:`put_immutable`.
        """
        if self.lock is not None:
            return self.put_immutable(key, blob, existing_ok=existing_ok)
        return self.backend.put(key, blob, if_absent=True)

    def put_immutable(self, key: str, blob: bytes, *, existing_ok: bool = True,
                      probe: bool = False) -> bool:
        """Store ``key`` locked for N + S days unless it exists; an existing one keeps N days ahead.

        Object Lock repositories only (:mod:`fleece.repo.object_lock`). With
        ``probe`` (chunks, which are often there) a HEAD comes first, as the
        dedup probe it is anyway; otherwise the conditional create does, and
        a HEAD follows only when it finds the object. An existing object's
        lock comes with that HEAD and is extended there if it ends before
        now + N days (not with ``existing_ok=False``: a point is never
        written over). False when the object existed. Every lock is noted in
        :attr:`lock_ledger`.
        """
        assert self.lock is not None
        now = lock_clock()
        try:
            if not probe:
                raise ObjectMissing(key)
            found = self.backend.lock_of(key)
        except ObjectMissing:
            retention = self.lock.retention(now)
            if self.backend.put_locked(key, blob, retention):
                self.lock_ledger.note(key, retention.until)
                return True
            if not existing_ok:
                return False
            found = self.backend.lock_of(key)  # stored already (or meanwhile by another writer)
        if existing_ok:
            self.keep_locked(key, found, now)
        return False

    def keep_locked(self, key: str, found: Retention | None, now: float,
                    backend: Backend | None = None) -> float:
        """Extend ``key``'s lock (``found``, as read) to N + S days if it ends before now + N; its end."""
        assert self.lock is not None
        if found is not None and found.until >= self.lock.needed(now):
            self.lock_ledger.note(key, found.until)
            return found.until
        wanted = self.lock.retention(now)
        mode = found.mode if found is not None else wanted.mode  # compliance never becomes governance
        until = (backend or self.backend).extend_lock(key, Retention(mode, wanted.until)).until
        self.lock_ledger.note(key, until, extended=True)
        return until

    def lock_new_point(self, indexes: list[ChunkIndex], sources: list[RestorePoint],
                       workers: int = 16) -> dict[str, str]:
        """Make sure every object a new point names is locked until now + N days at least.

        ``indexes`` are the new point's (written already); ``sources`` the
        points whose indexes told the backup which objects were stored
        (parents, the latest point). Objects this process wrote or probed are
        in :attr:`lock_ledger`. The rest were named by ``sources``: while the
        earliest of their horizons is at least now + N they need no request;
        otherwise each of them, ``config`` and the key objects are extended to
        N + S days (one request each, in ``workers`` threads). Returns the
        point's ``object_lock`` member: the mode, this repository's id and the
        horizon, the earliest lock end of everything it needs.
        """
        assert self.lock is not None
        now = lock_clock()
        needed: dict[str, None] = {}
        for index in indexes:
            needed.update((keys.chunk_key(d), None) for _, d in index.stored())
            needed.update((keys.pack_key(r.pack), None) for _, r in index.delta_refs())
            needed.update((keys.page_key(n), None) for n in sorted(index.stored_pages()))
        ends: list[float] = []
        reused: list[str] = []
        for key in needed:
            until = self.lock_ledger.until(key)
            if until is None:
                reused.append(key)
            else:
                ends.append(until)
        # A horizon counts only where it was measured: a point copied from
        # another repository carries that repository's (fleece copy).
        horizons = [p.lock_horizon.timestamp() if p.lock_horizon and p.object_lock
                    and p.object_lock.get("repository") == self.config.id else 0.0 for p in sources]
        previous = min(horizons, default=0.0)
        if previous >= self.lock.needed(now):
            ends.append(previous)  # covers the reused objects, config and the keys
        else:
            store = [(self.raw_backend, k) for k in
                     (keys.CONFIG_KEY, *self.raw_backend.list(keys.KEY_OBJECTS_PREFIX))]
            jobs = [(self.backend, k) for k in reused] + store
            with ThreadPoolExecutor(max(1, min(workers, len(jobs))),
                                    thread_name_prefix="fleece-lock") as pool:
                ends += pool.map(lambda job: self.keep_locked(job[1], None, now, job[0]), jobs)
        horizon = min(ends, default=self.lock.retention(now).until)
        return {"mode": self.lock.mode, "repository": self.config.id,
                "horizon": iso_utc(datetime.fromtimestamp(horizon, UTC))}

    # -- deltas and packs (format 2) -----------------------------------------

    def put_pack(self, blob: bytes) -> bytes:
        """Store a sealed pack (:class:`~fleece.repo.delta.PackWriter`); returns its name.

        Named by the repository hash of its bytes and written with a
        conditional create, so a retried or repeated pack is one object.
        The restore point is never written before this returns.
        """
        digest = self.digest(blob)
        self.create(keys.pack_key(digest), blob)
        pause_point(Phase.PACK_STORED)
        return digest

    def get_delta(self, ref: DeltaRef) -> bytes:
        """A delta's plaintext, fetched with one ranged read and checked against its digest."""
        key = keys.pack_key(ref.pack)
        try:
            blob = self.backend.get_range(key, ref.offset, ref.length)
        except ObjectMissing:
            raise RepositoryCorrupt(f"pack {key} is missing from {self.url}") from None
        return decode_delta(blob, ref, self.digest)

    def read_position(self, index: ChunkIndex, i: int) -> bytes:
        """The plaintext of chunk position ``i``: its base with its deltas applied, length-checked.

        At most ``1 + MAX_DEPTH`` object reads, whatever the chain behind the point.
        """
        length = index.chunk_length(i)
        digest = index.get(i)
        layers = index.deltas_of(i)
        if digest is None:
            if not layers:
                return bytes(length)
            data = bytearray(length)
        else:
            base = self.get_chunk(digest)
            if len(base) != length:
                raise RepositoryCorrupt(f"chunk {digest.hex()} at chunk {i} holds {len(base)} "
                                        f"bytes, expected {length}")
            if not layers:
                return base
            data = bytearray(base)
        for ref in layers:
            apply_delta(data, self.get_delta(ref), f"delta of pack {ref.pack.hex()} at chunk {i}")
        return bytes(data)

    def read_position_into(self, index: ChunkIndex, i: int, out: memoryview) -> None:
        """:meth:`read_position` into ``out`` (exactly the position's length): the restore path.

        The same reads and checks, but the base chunk decodes straight into
        the caller's buffer and the deltas are applied there, so a restore
        allocates no chunk-sized object per position.
        """
        length = index.chunk_length(i)
        if len(out) != length:
            raise ValueError(f"buffer of {len(out)} bytes for a {length}-byte chunk")
        digest = index.get(i)
        if digest is None:
            out[:] = bytes(length)  # a zero base under deltas (rare: fresh writes to a hole)
        else:
            key = keys.chunk_key(digest)
            try:
                blob = self.backend.get(key)
            except ObjectMissing:
                raise RepositoryCorrupt(f"chunk {key} is missing from {self.url}") from None
            decode_chunk_into(blob, out, digest, self.chunk_name,
                              f"chunk {digest.hex()} at chunk {i}")
        for ref in index.deltas_of(i):
            apply_delta(out, self.get_delta(ref), f"delta of pack {ref.pack.hex()} at chunk {i}")

    # -- indexes ------------------------------------------------------------

    def write_index(self, point_id: str, disk: str, index: ChunkIndex) -> tuple[str, str]:
        """Store a disk's index; returns ``(key, sha256 hex)`` for its :class:`DiskRecord`."""
        key, digest, _ = self.write_index_counted(point_id, disk, index)
        return key, digest

    def write_pages(self, index: ChunkIndex, workers: int = 8) -> IndexWrite:
        """Store every page of a version-3 index whose name is not known yet; what was written.

        A page that :meth:`ChunkIndex.page_is_zero` gets the zero marker and no
        object; any other is named by the repository hash of its object and
        written with a conditional create (a page another point or VM stored
        already costs no write). Pages an incremental did not touch keep the
        names its parent's top table gave them and are not even encoded.
        """
        out = IndexWrite()
        todo = list(index.unnamed_pages())
        if index.version < INDEX_VERSION_PAGED or not todo:
            return out

        def store(p: int) -> tuple[int, bytes | None, int]:
            if index.page_is_zero(p):
                return p, None, -1
            blob = index.encode_page(p)
            name = self.digest(blob)
            return p, name, (len(blob) if self.create(keys.page_key(name), blob) else -1)

        with ThreadPoolExecutor(max(1, min(workers, len(todo))),
                                thread_name_prefix="fleece-pages") as pool:
            for p, name, sent in pool.map(store, todo):
                index.name_page(p, name)
                if sent >= 0:
                    out.objects += 1
                    out.bytes += sent
        return out

    def write_index_counted(self, point_id: str, disk: str,
                            index: ChunkIndex) -> tuple[str, str, IndexWrite]:
        """:meth:`write_index`, also saying how many objects and bytes it wrote (pages, index)."""
        key = keys.index_key(point_id, disk)
        written = self.write_pages(index)
        blob = index.to_bytes()
        written.objects += 1
        written.bytes += len(blob)
        self.flush()  # every chunk the index names is durable before the index exists
        if self.lock is not None:
            # A locked index cannot be written over; one a resumed copy finds
            # with the very same bytes is the same index (its lock kept).
            if not self.put_immutable(key, blob, existing_ok=False):
                if self.backend.get(key) != blob:
                    raise RepositoryError(f"index {key} exists already; nothing was written over it")
                self.keep_locked(key, self.backend.lock_of(key), lock_clock())
        else:
            self.backend.put(key, blob)
        return key, hashlib.sha256(blob).hexdigest(), written

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
        index = self.parse_index(blob, what)
        if index.chunk_size != point.chunk_size or index.disk_size != record.virtual_size:
            raise RepositoryCorrupt(f"{what} disagrees with the point on chunk or disk size")
        return index

    def parse_index(self, blob: bytes, what: str, workers: int = 8) -> ChunkIndex:
        """An index object's content; for a top table (version 3) every page it names is read,
        checked against its name and loaded: one read per distinct page, in ``workers`` threads."""
        index = ChunkIndex.from_bytes(blob, what)
        if index.page_names is None:
            return index
        wanted: dict[bytes, list[int]] = {}
        for p, name in enumerate(index.page_names):
            if name is not None and name != ZERO_MARKER:
                wanted.setdefault(name, []).append(p)
        if not wanted:
            return index

        def fetch(name: bytes) -> bytes:
            key = keys.page_key(name)
            try:
                page = self.backend.get(key)
            except ObjectMissing:
                raise RepositoryCorrupt(f"page {key} of {what} is missing from {self.url}") from None
            if self.digest(page) != name:
                raise RepositoryCorrupt(f"page {key} of {what} does not match its name (damaged)")
            return page

        names = list(wanted)
        with ThreadPoolExecutor(max(1, min(workers, len(names))),
                                thread_name_prefix="fleece-pages") as pool:
            for name, page in zip(names, pool.map(fetch, names), strict=True):
                for p in wanted[name]:
                    index.load_page(p, page, f"page {keys.page_key(name)} of {what}")
        return index

    # -- restore points -----------------------------------------------------

    def write_point(self, point: RestorePoint) -> None:
        """Commit ``point``: call this last, after its chunks and indexes are stored."""
        key = keys.point_key(point.vm, point.id)
        self.flush()
        if not self.create(key, point.to_json(), existing_ok=False):
            raise RepositoryError(f"restore point {key} already exists; nothing was written")
        if self.memory is not None:
            self.memory.note_point(point.vm, point.id)

    def point_refs(self, vm: str | None = None) -> list[tuple[str, str]]:
        """``(vm, point id)`` of every point, sorted by id, from the keys alone (no reads).

        With a :attr:`memory`, a listing whose newest point of a VM is older
        than the newest this host saw is refused (a store hiding points).
        """
        refs = [ref for key in self.backend.list(keys.point_prefix(vm))
                if (ref := keys.parse_point_key(key)) is not None]
        if self.memory is not None:
            self.memory.check_points(refs, vm)
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
                    f"'latest' is ambiguous: {self.url} holds points of VMs {', '.join(vms)} "
                    "(say which with --vm)"
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
        if self.memory is not None:
            remaining = [pid for key in self.backend.list(keys.point_prefix(point.vm))
                         if (ref := keys.parse_point_key(key)) is not None and (pid := ref[1])]
            self.memory.forget_point(point.vm, point.id, remaining)



@dataclass
class IndexWrite:
    """What writing one index stored: objects and bytes (pages, then the index itself)."""

    objects: int = 0
    bytes: int = 0


def _create(backend: Backend, key: str, blob: bytes, lock: ObjectLock | None) -> bool:
    """A conditional create, locked for N + S days when the repository locks objects."""
    if lock is None:
        return backend.put(key, blob, if_absent=True)
    return backend.put_locked(key, blob, lock.retention(lock_clock()))


def plaintext_refused(url: str, verb: str) -> BadInput:
    """The refusal to ``verb`` a plain repository while a passphrase is given (fail closed)."""
    what = "is not encrypted (its config says encryption none)" if verb == "open" else \
        "would not be encrypted"
    return BadInput(f"repository {url} {what}, but a passphrase was given: refusing to {verb} a "
                    "plaintext repository with it (unset the passphrase for a plain one); nothing "
                    "was written")


def read_config(backend: Backend) -> RepositoryConfig:
    """The repository's ``config``; :class:`NotARepository` where there is none."""
    try:
        blob = backend.get(keys.CONFIG_KEY)
    except ObjectMissing:
        raise NotARepository(f"{backend.url} is not a fleece repository (no config)") from None
    return RepositoryConfig.from_json(blob, backend.url)


def unlock(backend: Backend, config: RepositoryConfig, passphrase: bytes) -> tuple[MasterKey, str]:
    """The master key and the id of the key object ``passphrase`` opens; :class:`WrongPassphrase`.

    A key that opens but whose master key does not authenticate ``config``
    belongs to another repository (an imported key, a swapped config): it is
    passed over like a wrong passphrase.
    """
    found = False
    for key in sorted(backend.list(keys.KEY_OBJECTS_PREFIX)):
        found = True
        try:
            doc = parse_key(backend.get(key), f"key {key}")
        except (ObjectMissing, RepositoryCorrupt):
            continue  # removed meanwhile, or not a key: the others may open
        master = unwrap_key(doc, passphrase)
        if master is not None and config.auth is not None and secrets.compare_digest(
                config_auth(master, config.document()), config.auth):
            return master, str(doc["id"])
    if not found:
        raise RepositoryCorrupt(f"repository {backend.url} is encrypted but holds no key; nothing "
                                "was changed (restore a key with 'fleece key import')")
    raise WrongPassphrase(f"wrong passphrase for repository {backend.url}, nothing was changed")
