"""``--metrics-file PATH``: the outcome of a run for Prometheus (node_exporter's textfile collector).

After ``backup``, ``prune``, ``gc``, ``verify`` and ``copy`` fleece rewrites one
Prometheus text-format file: it reads the samples already there, replaces
those of this command, VM and repository, and writes the whole file to a
temporary name in the same directory and renames it over the old one, so
the collector never reads half a file. Several commands, VMs and
repositories can share one file; a lock next to it (``PATH.lock``)
serializes fleece processes that update it at once.

Every series carries ``command``, ``vm`` and ``repository`` labels (the
repository URL as given, never credentials: s3:// URLs cannot hold any,
and user information in other URLs is dropped). A successful run sets
``fleece_last_success_timestamp_seconds``, ``fleece_last_duration_seconds``
and the command's own gauges; a failed one increments
``fleece_failures_total`` and sets ``fleece_last_failure_timestamp_seconds``,
and keeps everything the last success wrote. ``verify`` finding damage is a
failure whose ``fleece_verify_damaged_points`` says how much. ``verify --fsck``
and ``--boot`` record under ``command="verify-fsck"``/``"verify-boot"``: a
failed point sets ``fleece_verify_result`` 0, and
``fleece_verify_newest_verified_point_timestamp_seconds`` is what an alert on
"no verified point newer than N days" compares with ``time()``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from fleece.errors import BadInput, FleeceError

Labels = tuple[tuple[str, str], ...]

METRICS: dict[str, tuple[str, str]] = {
    # name: (type, help)
    "fleece_last_success_timestamp_seconds": ("gauge", "Unix time the last successful run ended."),
    "fleece_last_failure_timestamp_seconds": ("gauge", "Unix time the last failed run ended."),
    "fleece_failures_total": ("counter", "Runs that failed (verify: that found damage)."),
    "fleece_last_duration_seconds": ("gauge", "Wall-clock seconds of the last successful run."),
    "fleece_backup_bytes_dirty": (
        "gauge", "Bytes the dirty bitmaps marked since the parent point (incremental disks; 0 for full)."),
    "fleece_backup_bytes_read": ("gauge", "Bytes read from the VM's disks by the last backup."),
    "fleece_backup_bytes_stored": ("gauge", "Bytes of new objects the last backup stored (compressed)."),
    "fleece_backup_audit_mismatches": (
        "gauge", "backup --audit-bitmap: sampled clean chunks that differed from the parent (then full)."),
    "fleece_backup_objects_written": ("gauge", "Chunks, indexes and points the last backup wrote."),
    "fleece_prune_points_kept": ("gauge", "Restore points the last prune kept."),
    "fleece_prune_points_removed": ("gauge", "Restore points the last prune removed."),
    "fleece_gc_objects_deleted": ("gauge", "Chunks and indexes the last gc deleted."),
    "fleece_gc_bytes_freed": ("gauge", "Bytes the last gc freed."),
    "fleece_gc_chunks_kept": ("gauge", "Chunks the last gc kept."),
    "fleece_copy_points_copied": ("gauge", "Restore points the last copy wrote to the destination."),
    "fleece_copy_bytes_copied": ("gauge", "Bytes of chunks the last copy sent to the destination."),
    "fleece_copy_objects_written": ("gauge", "Chunks, indexes and points the last copy wrote."),
    "fleece_verify_points_checked": ("gauge", "Restore points the last verify checked."),
    "fleece_verify_damaged_points": ("gauge", "Restore points the last verify found damaged."),
    "fleece_verify_bytes_checked": ("gauge", "Bytes of chunks the last (deep) verify fetched and checked."),
    "fleece_verify_result": ("gauge", "verify --fsck/--boot: 1 when the last judged point passed, else 0."),
    "fleece_verify_seconds": ("gauge", "verify --fsck/--boot: seconds the last judgement took."),
    "fleece_verify_time_to_ready_seconds": (
        "gauge", "verify --boot: seconds from QEMU's start until the guest was judged ready."),
    "fleece_verify_newest_verified_point_timestamp_seconds": (
        "gauge", "verify --fsck/--boot: creation time of the VM's newest point whose newest verdict passed."),
}
_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+\d+)?$")
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')


def safe_repository(url: str) -> str:
    """The repository for a label: a path or URL without user information (``user:secret@``)."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse_samples(text: str) -> dict[tuple[str, Labels], float]:
    """The samples of a text-format file this module wrote (lines it cannot read are dropped)."""
    samples: dict[tuple[str, Labels], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if not m:
            continue
        labels = tuple(sorted((k, _unescape(v)) for k, v in _LABEL_RE.findall((m.group(2) or "{}")[1:-1])))
        try:
            samples[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            continue
    return samples


def render(samples: dict[tuple[str, Labels], float]) -> str:
    """Samples as Prometheus text format, grouped by metric with HELP and TYPE."""
    out: list[str] = []
    for name in sorted({n for n, _ in samples}):
        kind, help_text = METRICS.get(name, ("gauge", name))
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for (n, labels), value in sorted(samples.items()):
            if n == name:
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                out.append(f"{name}{{{text}}} {value:.17g}")
    return "\n".join(out) + "\n"


@dataclass
class Run:
    """One command's run, filled in by the command; recorded by :func:`recorded`."""

    command: str
    repository: str
    vm: str = ""
    values: dict[str, float] = field(default_factory=dict)
    """Gauges of a successful run: metric name → value."""
    failed: bool = False
    """Set by a command that completes but must count as failed (verify finding damage)."""

    @property
    def labels(self) -> Labels:
        """The label set of this run's series."""
        return (("command", self.command), ("repository", safe_repository(self.repository)),
                ("vm", self.vm))


class MetricsFile:
    """One ``--metrics-file``: checked before the run, updated atomically after it."""

    def __init__(self, path: str) -> None:
        """Refuse (``BadInput``) a path whose directory does not exist or that is a directory."""
        self.path = Path(path)
        if self.path.is_dir() or not self.path.parent.is_dir():
            raise BadInput(f"--metrics-file {path}: not a file in an existing directory")
        if not os.access(self.path.parent, os.W_OK):
            raise BadInput(f"--metrics-file {path}: the directory is not writable")

    def update(self, run: Run, start: float, end: float, ok: bool) -> None:
        """Merge this run into the file (see module docstring)."""
        with self._locked():
            try:
                samples = parse_samples(self.path.read_text())
            except FileNotFoundError:
                samples = {}
            except (OSError, UnicodeDecodeError):
                samples = {}  # unreadable: start over rather than fail the run's report
            labels = run.labels
            if ok:
                samples[("fleece_last_success_timestamp_seconds", labels)] = end
                samples[("fleece_last_duration_seconds", labels)] = end - start
            else:
                samples[("fleece_last_failure_timestamp_seconds", labels)] = end
            key = ("fleece_failures_total", labels)
            samples[key] = samples.get(key, 0.0) + (0 if ok else 1)
            if ok or run.failed:
                for name, value in run.values.items():
                    samples[(name, labels)] = float(value)
            self._write(render(samples))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, text: str) -> None:
        # A hidden name without .prom: the collector skips it until the rename.
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


@contextlib.contextmanager
def recorded(path: str | None, command: str, repository: str, vm: str | None = None) -> Iterator[Run]:
    """Time the ``with`` block and record its outcome in ``path`` (nothing when None).

    A :class:`FleeceError` (or Ctrl-C) in the block is recorded as a failure
    and re-raised. A metrics file that cannot be written after a successful
    run fails the command (exit 1): monitoring that silently stops is worse.
    """
    if not path:
        yield Run(command, repository, vm or "")
        return
    target = MetricsFile(path)
    run = Run(command, repository, vm or "")
    start = time.time()
    try:
        yield run
    except (FleeceError, KeyboardInterrupt):
        with contextlib.suppress(OSError):  # the command's own error is the one to report
            target.update(run, start, time.time(), ok=False)
        raise
    try:
        target.update(run, start, time.time(), ok=not run.failed)
    except OSError as exc:
        raise FleeceError(f"could not write the metrics file {path}: {exc.strerror or exc}") from None
