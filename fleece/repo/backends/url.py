"""Turn a ``--repo`` argument into a backend.

Accepted: a directory path, ``file:///abs/path``, ``s3://bucket/prefix``.
The S3 backend (and boto3) is imported only when an S3 URL is used, so
local repositories do not pay for it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from fleece.errors import BadInput
from fleece.repo.backends.base import Backend
from fleece.repo.backends.file import FileBackend


def _local(path: Path, group_access: bool = False) -> FileBackend:
    # A repository is a directory (or a place to make one); anything else is
    # the user naming the wrong thing, not a failed operation.
    if path.exists() and not path.is_dir():
        raise BadInput(f"--repo {path} is not a directory (a local repository is one)")
    return FileBackend(path, group_access=group_access)


def _file_url(url: str, unsafe_locks: bool = False, group_access: bool = False) -> Backend:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise BadInput(f"file URL {url} names host {parts.netloc!r}; use file:///abs/path")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise BadInput(f"file URL {url} needs an absolute path (file:///abs/path)")
    return _local(Path(path), group_access)


def _s3_url(url: str, unsafe_locks: bool = False, group_access: bool = False) -> Backend:
    # The S3 backend owns S3 URL rules (bucket names, prefixes, no
    # credentials echoed back); imported here so local use skips boto3.
    from fleece.repo.backends.s3 import S3Backend, parse_s3_url

    bucket, prefix = parse_s3_url(url)
    return S3Backend(bucket, prefix, unsafe_locks=unsafe_locks)


_SCHEME_LIKE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
"""What starts a URL: a word and a colon (a local path that starts so is written ``./NAME``)."""

SCHEMES: dict[str, Callable[[str, bool, bool], Backend]] = {
    "file": _file_url,
    "s3": _s3_url,
}
"""URL scheme → backend factory: a new object store is one entry here."""


def open_backend(url: str, *, unsafe_locks: bool = False, group_access: bool = False) -> Backend:
    """The backend that ``url`` names; ``BadInput`` for anything unsupported.

    ``unsafe_locks`` lets an S3 store that does not enforce conditional
    creates hold leases anyway (the operator's explicit opt-in);
    ``group_access`` lets a directory repository's group read what is
    written (0750/0640 instead of 0700/0600).
    """
    if not url:
        raise BadInput("--repo needs a directory path, file:///abs/path or s3://bucket/prefix")
    if "://" not in url:
        if (typo := _SCHEME_LIKE.match(url)) is not None:
            # s3:/vault/fleece or s3:vault would otherwise be a local directory named "s3:".
            raise BadInput(
                f"repository {url!r} looks like a mistyped URL ({typo.group(0)} without '//'): "
                "write s3://bucket/prefix or file:///abs/path, or ./" + url
                + " for a local directory of that name; nothing was written")
        return _local(Path(url), group_access)
    scheme = urlsplit(url).scheme.lower()
    factory = SCHEMES.get(scheme)
    if factory is None:
        raise BadInput(f"unsupported repository URL scheme {scheme!r}: use a path, file:///abs/path "
                       "or s3://bucket/prefix")
    return factory(url, unsafe_locks, group_access)
