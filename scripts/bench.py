"""fleece benchmark: every figure is a ratio against a bound measured in the same run.

Builds a realistic disk (ext4 made with ``mkfs.ext4 -d`` from a system
library directory, plus incompressible data and holes), runs it in a real
QEMU (TCG, idle firmware, so the VM is *running* and the pause is real), and
measures:

* I/O path: full backup with ``--compress none`` vs ``nbdcopy URI null:`` on
  the same point-in-time export of the same QEMU (goal >= 0.7);
* compute path: full backup with the default compression vs the same bytes
  hashed and compressed on every core with no I/O (goal >= 0.8);
* incremental with 1 % of the disk dirty (fresh random bytes), as a fraction of the full
  (goal <= 0.05);
* guest pause at the snapshot point (goal <= 20 ms);
* peak RSS of ``fleece backup`` for a 4 GiB and a 16 GiB virtual disk holding 512 MiB of
  random data each (goal <= 256 MiB, flat);
* restore to a file vs ``nbdcopy`` of the export to a file;
* reverse-delta peak while the guest overwrites the disk during a backup,
  with and without trim;
* encryption: full backup and restore into AES-256-GCM and ChaCha20-Poly1305
  repositories as a ratio of a plain one (goal <= 1.10; scripts/bench_encryption.py).

Every time is a whole process's (``fleece`` and ``nbdcopy`` alike, start to
exit), as a user waits for it. Repositories of the I/O and compute rows live on tmpfs (``/dev/shm``):
``nbdcopy … null:`` writes nothing, and a backup into a local directory is
bounded by that disk's durable write speed instead — which is measured in
the same run and shown in its own row.

``--encryption`` runs only the encryption rows (as ``scripts/bench-encryption``).

``--tls`` runs only the TLS section: the same export read over TCP with TLS
(x509, loopback) vs over the unix socket, by ``nbdcopy … null:`` and by a
``fleece backup --from-export --compress none`` (ratios TLS / unix).

``--speed`` runs only the issue-16 comparisons, whole processes, each pair
interleaved: full backup ``--compress none`` vs ``nbdcopy --flush URI FILE``
and default settings (and ``--compress zstd:3``) vs ``nbdcopy URI - | zstd -3 -T0 > FILE`` on a 4 GiB
disk holding 2 GiB (half random, half text) and on a 4 GiB disk holding
1 GiB in scattered 1 MiB pieces; an incremental with nothing dirty (wall);
restore vs ``nbdcopy --flush``; peak RSS.

Usage: scripts/bench [--data DIR] [--disk-size 2G] [--keep] [--tls]
       scripts/bench --encryption [--runs 3]   # only the encryption cost rows
       scripts/bench --live-restore     # only the live-restore rows (scripts/bench_live.py)
       scripts/bench --speed [--dir /var/tmp] [--runs 3]
       scripts/bench --restore [--dir /var/tmp] [--runs 3] [--keep]   # only the restore rows
       scripts/bench --restore-versus OTHER_FLEECE [--runs 3]   # the same, this vs another build
       scripts/bench --peers [--dir /var/tmp] [--runs 3]   # full backup vs QEMU's job, virtnbdbackup
       scripts/bench --idle-versus OTHER_FLEECE [--runs 10]
       scripts/bench --full-versus OTHER_FLEECE [--runs 3]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv" / "bin"
FLEECE = os.environ.get("FLEECE", str(VENV / "fleece"))
"""The fleece under test; FLEECE=/path/to/another/fleece measures another build (before/after).

A wrapper for a source tree must keep the current directory off ``sys.path``
(``python -P -m fleece``): the bench runs from this checkout, whose own
``fleece`` would shadow the tree under test.
"""
MiB = 1 << 20
GiB = 1 << 30


def sh(*args: str | Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], check=True, text=True, capture_output=True, **kw)


def timed(*args: str | Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    t = time.perf_counter()
    p = sh(*args)
    return time.perf_counter() - t, p


def fleece_json(*args: str | Path) -> tuple[float, dict[str, Any]]:
    dt, p = timed(FLEECE, *args, "--json")
    return dt, json.loads(p.stdout)


# Linux carries a process's peak RSS across fork and exec, so a child of this
# (large) benchmark process would report our peak, not its own: measure from a
# small wrapper process instead.
_RSS_WRAPPER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stderr=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
sys.stderr.write(f"{usage.ru_maxrss * 1024} {os.waitstatus_to_exitcode(status)}\\n")
"""


def rss_of(*args: str | Path) -> tuple[int, dict[str, Any]]:
    """Run a command, return (its own peak RSS in bytes, its JSON output)."""
    peak, out = peak_rss(*args)
    return peak, json.loads(out)


def peak_rss(*args: str | Path) -> tuple[int, str]:
    """Run a command that must succeed, return (its own peak RSS in bytes, its stdout)."""
    p = subprocess.run(["/usr/bin/python3", "-c", _RSS_WRAPPER, *map(str, args)],
                       capture_output=True, text=True, check=True)
    peak, rc = p.stderr.split()[-2:]
    if int(rc):
        raise SystemExit(f"{args[:2]} failed with {rc}")
    return int(peak), p.stdout


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_of(*args: str | Path) -> tuple[float, dict[str, Any]]:
    """Run a command through the wrapper; return (its CPU seconds, its JSON output)."""
    p = subprocess.run(["/usr/bin/python3", "-c", _CPU_WRAPPER, *map(str, args)],
                       capture_output=True, text=True, check=True)
    return float(p.stderr.split()[-1]), json.loads(p.stdout)


_CPU_WRAPPER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stderr=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
sys.stderr.write(f"{usage.ru_utime + usage.ru_stime}\\n")
"""


class VM:
    """A running QEMU with one qcow2 disk ``vda`` and two QMP sockets."""

    def __init__(self, work: Path, image: Path, name: str, fmt: str = "qcow2") -> None:
        self.qmp = str(work / f"{name}.qmp")
        self.guest = str(work / f"{name}.guest")
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-nodefaults", "-display", "none",
             "-m", "64", "-name", name,
             "-blockdev", f"driver=file,filename={image},node-name=file-vda,discard=unmap",
             "-blockdev", f"driver={fmt},file=file-vda,node-name=fmt-vda,discard=unmap",
             "-device", "virtio-blk-pci,drive=fmt-vda,id=vda",
             "-qmp", f"unix:{self.qmp},server=on,wait=off",
             "-qmp", f"unix:{self.guest},server=on,wait=off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        from qemu.qmp.legacy import QEMUMonitorProtocol

        # A loaded host may take seconds to start QEMU, and a socket that
        # exists may not be listening yet.
        deadline = time.monotonic() + 60
        while True:
            try:
                if os.path.exists(self.guest):
                    self.mon = QEMUMonitorProtocol(self.guest)
                    self.mon.connect()
                    break
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
            time.sleep(0.05)

    def write(self, offset: int, length: int, pattern: int) -> None:
        """The guest writes (HMP qemu-io on the device)."""
        self.mon.cmd_raw("human-monitor-command", {
            "command-line": f'qemu-io -d /machine/peripheral/vda/virtio-backend '
                            f'"write -P {pattern} {offset} {length}"'})

    def write_random(self, offset: int, length: int, work: Path) -> None:
        """The guest writes ``length`` fresh random bytes: data that neither compresses nor dedups."""
        src = work / "random-write.bin"
        src.write_bytes(os.urandom(length))
        self.mon.cmd_raw("human-monitor-command", {
            "command-line": f'qemu-io -d /machine/peripheral/vda/virtio-backend '
                            f'"write -s {src} {offset} {length}"'})
        src.unlink()

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            self.mon.cmd_raw("quit")
            self.mon.close()
        except Exception:
            pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def build_disk(work: Path, data: Path, size: str, random_mib: int = 128) -> Path:
    """An ext4 image of ``data`` plus ``random_mib`` MiB of incompressible bytes, as qcow2."""
    tree = work / "tree"
    tree.mkdir()
    sh("cp", "-a", data, tree / "data")
    with open(tree / "random.bin", "wb") as f:
        for _ in range(random_mib):
            f.write(os.urandom(MiB))
    raw = work / "disk.raw"
    sh("mkfs.ext4", "-q", "-F", "-d", tree, raw, size)
    image = work / "disk.qcow2"
    sh("qemu-img", "convert", "-O", "qcow2", raw, image)
    raw.unlink()
    shutil.rmtree(tree)
    return image


def compute_bound(uri: str, chunk: int, level: int, threads: int) -> tuple[float, int, float]:
    """Throughput (B/s) of BLAKE3 + zstd over the disk's data chunks on every core, no I/O."""
    sys.path.insert(0, str(ROOT))
    from fleece.backup.reader import BASE_ALLOCATION, connect, disconnect, plan_chunks, pread_chunk
    from fleece.repo.format.codec import chunk_digest, encode_chunk, is_zero

    h = connect(uri, (BASE_ALLOCATION,))
    plan = plan_chunks(h, chunk)
    chunks = [pread_chunk(h, *plan.chunk_range(i)) for i in plan.to_read()]
    disconnect(h)
    total = sum(map(len, chunks))
    stored = 0

    def work(part: list[bytes]) -> int:
        n = 0
        for c in part:
            if not is_zero(c):
                chunk_digest(c, "blake3")  # the default hash of new repositories
                n += len(encode_chunk(c, level))
        return n

    parts = [chunks[i::threads] for i in range(threads)]
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        stored = sum(pool.map(work, parts))
    dt = time.perf_counter() - t
    return total / dt, total, stored / total


def delta_peak(scratch: Path, stop: threading.Event, out: list[int]) -> None:
    peak = 0
    while not stop.is_set():
        size = 0
        for p in scratch.rglob("*"):
            try:
                if p.is_file():
                    size += p.stat().st_blocks * 512
            except FileNotFoundError:
                pass
        peak = max(peak, size)
        time.sleep(0.005)
    out.append(peak)


def overwrite_during_backup(vm: VM, repo: Path, scratch: Path, data_bytes: int,
                            extra: list[str]) -> tuple[int, dict[str, Any]]:
    """Back up while the guest keeps rewriting its data; return the reverse delta's peak.

    The guest writes 4 MiB at random places in the data region at a steady
    rate (as a busy VM would), so some writes land where the backup has
    already been and some ahead of it. Trimming what was read lets the first
    kind skip the copy into the reverse delta.
    """
    import random

    scratch.mkdir(exist_ok=True)
    stop = threading.Event()
    peak: list[int] = []
    watcher = threading.Thread(target=delta_peak, args=(scratch, stop, peak))
    rng = random.Random(1)
    slots = max(1, data_bytes // (4 * MiB))

    def guest() -> None:
        time.sleep(0.3)  # let the export come up first
        while not stop.is_set():
            vm.write(rng.randrange(slots) * 4 * MiB, 4 * MiB, rng.randrange(1, 255))
            time.sleep(0.02)

    writer = threading.Thread(target=guest)
    watcher.start()
    writer.start()
    _, res = fleece_json("backup", "--init", "--qmp", vm.qmp, "--drive", "vda", "--repo", repo,
                         "--level", "full", "--scratch-dir", scratch, "--readers", "1",
                         "--storers", "1", *extra)
    stop.set()
    writer.join()
    watcher.join()
    return peak[0], res


def make_tls_credentials(d: Path) -> tuple[Path, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client one (certtool); (server dir, client dir)."""
    d.mkdir(mode=0o700)
    (d / "ca.tmpl").write_text('cn = "bench CA"\nca\ncert_signing_key\nexpiration_days = 2\n')
    sh("certtool", "--generate-privkey", "--key-type=ecdsa", "--outfile", d / "ca-key.pem")
    sh("certtool", "--generate-self-signed", "--load-privkey", d / "ca-key.pem", "--template",
       d / "ca.tmpl", "--outfile", d / "ca-cert.pem")
    dirs = []
    for role, extra in (("server", 'ip_address = "127.0.0.1"\ntls_www_server\n'),
                        ("client", "tls_www_client\n")):
        out = d / role
        out.mkdir()
        shutil.copy(d / "ca-cert.pem", out / "ca-cert.pem")
        (d / f"{role}.tmpl").write_text(f'cn = "{role}"\n{extra}encryption_key\nsigning_key\n'
                                        "expiration_days = 2\n")
        sh("certtool", "--generate-privkey", "--key-type=ecdsa", "--outfile", out / f"{role}-key.pem")
        os.chmod(out / f"{role}-key.pem", 0o600)
        sh("certtool", "--generate-certificate", "--load-privkey", out / f"{role}-key.pem",
           "--load-ca-certificate", d / "ca-cert.pem", "--load-ca-privkey", d / "ca-key.pem",
           "--template", d / f"{role}.tmpl", "--outfile", out / f"{role}-cert.pem")
        dirs.append(out)
    return dirs[0], dirs[1]


def tls_rows(vm: VM, work: Path, shm: Path) -> list[tuple[str, str, str, str]]:
    """nbdcopy and fleece's read path over TLS on loopback vs over the unix socket, same disk."""
    import socket

    server, client = make_tls_credentials(work / "tls")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results: dict[str, tuple[float, float, int]] = {}
    for name, listen in (("unix", []), ("tls", ["--listen", f"tcp:127.0.0.1:{port}",
                                                "--tls-creds", str(server)])):
        p = sh(FLEECE, "export", "start", "--bounded-requests",
               "--qmp", vm.qmp, "--drive", "vda", *listen, "--json")
        exported = work / f"export-{name}.json"
        exported.write_text(p.stdout)
        uri = json.loads(p.stdout)["disks"][0]["uri"]
        # nbdcopy takes the client's certificate directory in the URI.
        copy_uri = uri + (f"?tls-certificates={client}" if name == "tls" else "")
        copy_s = statistics.median(timed("nbdcopy", copy_uri, "null:")[0] for _ in range(3))
        reads = []
        for _ in range(3):
            creds = ["--tls-creds", str(client)] if name == "tls" else []
            _, res = fleece_json("backup", "--init", "--from-export", exported, "--vm", "bench", "--repo",
                                 shm / "repo-tls", "--compress", "none", *creds)
            shutil.rmtree(shm / "repo-tls")
            reads.append(res)
        read_s = statistics.median(r["disks"][0]["seconds"] for r in reads)
        results[name] = (copy_s, read_s, reads[0]["disks"][0]["bytes_read"])
        sh(FLEECE, "export", "stop", "--qmp", vm.qmp, "--abort")
    (cu, ru, n), (ct, rt, _) = results["unix"], results["tls"]
    return [
        ("TLS/unix: nbdcopy null: over nbds:// (x509)", f"{cu / ct:.2f}", "—",
         f"unix {cu:.2f}s ({n / cu / MiB:.0f} MiB/s), TLS {ct:.2f}s ({n / ct / MiB:.0f} MiB/s)"),
        ("TLS/unix: backup --from-export --compress none", f"{ru / rt:.2f}", "—",
         f"unix {ru:.2f}s ({n / ru / MiB:.0f} MiB/s), TLS {rt:.2f}s ({n / rt / MiB:.0f} MiB/s)"),
    ]

# -- --speed: the data path against plain copies (issue 16) ------------------------------------

def _text_stream(limit: int) -> bytes:
    """``limit`` bytes of real text: the system's Python sources and docs, pass-numbered."""
    out: list[bytes] = []
    n = 0
    roots = [Path("/usr/lib/python3"), Path(sys.base_prefix) / "lib", Path("/usr/share/man")]
    for rnd in range(1000):
        for root in roots:
            for path in sorted(root.rglob("*")):
                if path.suffix not in (".py", ".txt", ".rst", ".html", ".1", ".5", ".8", ".3"):
                    continue
                try:
                    blob = path.read_bytes()
                except OSError:
                    continue
                head = f"# pass {rnd} {path}\n".encode()  # no two passes identical
                out += [head, blob]
                n += len(head) + len(blob)
                if n >= limit:
                    return b"".join(out)[:limit]
    return b"".join(out)[:limit]


def build_speed_disks(work: Path) -> dict[str, tuple[Path, int]]:
    """The issue's two 4 GiB raw disks: 2 GiB data (half random, half text), and 1 GiB fragmented.

    Returns name -> (image, bytes of data).
    """
    import random

    text = _text_stream(GiB)
    disks = {}
    half = work / "half.raw"
    with open(half, "wb") as f:
        f.truncate(4 * GiB)
        for k in range(0, GiB, 64 * MiB):  # 1 GiB random at 0
            f.seek(k)
            f.write(os.urandom(64 * MiB))
        f.seek(2 * GiB)  # 1 GiB text at 2 GiB
        f.write(text)
    disks["2 GiB data (half random, half text)"] = (half, 2 * GiB)
    frag = work / "frag.raw"
    rng = random.Random(16)
    slots = sorted(rng.sample(range(4096), 1024))  # 1 GiB in scattered 1 MiB pieces
    with open(frag, "wb") as f:
        f.truncate(4 * GiB)
        for n, s in enumerate(slots):
            f.seek(s * MiB)
            f.write(os.urandom(MiB) if n % 2 else text[n * MiB : (n + 1) * MiB])
    disks["fragmented (1 GiB in 1 MiB pieces)"] = (frag, GiB)
    return disks


def _median_spread(times: list[float]) -> tuple[float, str]:
    m = statistics.median(times)
    return m, f"{min(times):.2f}-{max(times):.2f}"


def speed(args: argparse.Namespace) -> None:
    """The issue-16 ratios: fleece vs plain copies of the same export, each pair interleaved."""
    work = Path(tempfile.mkdtemp(prefix="fleece-bench-speed.", dir=args.dir))

    class Rows(list[tuple[str, str, str, str]]):
        def append(self, row: tuple[str, str, str, str]) -> None:
            print("bench --speed:", " | ".join(row), file=sys.stderr, flush=True)
            super().append(row)

    rows = Rows()
    vms: list[VM] = []
    runs = args.runs
    try:
        print(f"bench --speed: building two 4 GiB disks in {work} ...", file=sys.stderr)
        for name, (image, data) in build_speed_disks(work).items():
            vm = VM(work, image, f"speed{len(vms)}", fmt="raw")
            vms.append(vm)
            backup = ["backup", "--init", "--qmp", vm.qmp, "--drive", "vda"]
            repo = work / "repo"
            out = work / "copy.raw"
            zstd_bytes: list[int] = []

            def nbdcopy(*copy: str, vm: VM = vm, out: Path = out,
                        zstd_bytes: list[int] = zstd_bytes) -> float:
                _, exp = fleece_json("export", "start", "--bounded-requests",
                                     "--qmp", vm.qmp, "--drive", "vda")
                uri = exp["disks"][0]["uri"]
                try:
                    t = time.perf_counter()
                    subprocess.run([c.replace("URI", uri) for c in copy], check=True, shell=False)
                    dt = time.perf_counter() - t
                    if "zstd" in copy[-1]:
                        zstd_bytes.append(out.stat().st_size)
                    return dt
                finally:
                    sh(FLEECE, "export", "stop", "--qmp", vm.qmp, "--abort")
                    out.unlink(missing_ok=True)

            def full(*extra: str, repo: Path = repo,
                     backup: list[str] = backup) -> tuple[float, dict[str, Any]]:
                shutil.rmtree(repo, ignore_errors=True)
                return fleece_json(*backup, "--repo", repo, "--level", "full", *extra)

            # --compress none vs nbdcopy --flush into a file on the same file system.
            ref, mine, read = [], [], 0
            for _ in range(runs):
                ref.append(nbdcopy("nbdcopy", "--flush", "URI", str(out)))
                t, res = full("--compress", "none")
                mine.append(t)
                read = res["disks"][0]["bytes_read"]
            r, rs = _median_spread(ref)
            m, ms = _median_spread(mine)
            rows.append((f"{name}: full --compress none vs nbdcopy --flush", f"{r / m:.2f}",
                         ">= 0.8", f"nbdcopy {r:.2f}s ({rs}), fleece {m:.2f}s ({ms}); "
                         f"read {read / MiB:.0f} MiB of {data / MiB:.0f} MiB data "
                         f"({read / data:.3f})"))

            # default settings vs nbdcopy | zstd -3 -T0 > FILE
            # (and zstd:3, the size end of the level trade-off, against the same reference)
            ref, mine, other, stored, stored3 = [], [], [], 0, 0
            for _ in range(runs):
                ref.append(nbdcopy("sh", "-c", f"nbdcopy 'URI' - | zstd -q -3 -T0 > {out}"))
                t, res = full("--compress", "zstd:3")
                other.append(t)
                stored3 = res["disks"][0]["bytes_stored"]
                t, res = full()
                mine.append(t)
                stored = res["disks"][0]["bytes_stored"]
                point_id = res["point"]
            script_bytes = zstd_bytes[-1] if zstd_bytes else 0
            r, rs = _median_spread(ref)
            m, ms = _median_spread(mine)
            rows.append((f"{name}: full (defaults) vs nbdcopy | zstd -3 -T0", f"{r / m:.2f}",
                         ">= 1.5", f"script {r:.2f}s ({rs}) storing {script_bytes / MiB:.0f} MiB, "
                         f"fleece {m:.2f}s ({ms}) storing {stored / MiB:.0f} MiB"))
            m, ms = _median_spread(other)
            rows.append((f"{name}: full --compress zstd:3 vs nbdcopy | zstd -3 -T0", f"{r / m:.2f}",
                         "", f"fleece {m:.2f}s ({ms}) storing {stored3 / MiB:.0f} MiB"))

            # nothing dirty: the fixed cost of a run, end to end.
            idle = [fleece_json(*backup, "--repo", repo, "--level", "incremental")[0]
                    for _ in range(runs)]
            m, ms = _median_spread(idle)
            rows.append((f"{name}: incremental, nothing dirty (wall s)", f"{m:.2f}", "<= 0.3",
                         f"{ms} over {runs} runs"))

            rows.extend(restore_rows(name, runs, repo, point_id, out,
                                     partial(nbdcopy, "nbdcopy", "--flush", "URI", str(out))))

            shutil.rmtree(repo, ignore_errors=True)
            peak, _ = rss_of(FLEECE, *backup, "--repo", repo, "--json")
            rows.append((f"{name}: peak RSS of a full backup (MiB)", f"{peak / MiB:.0f}",
                         "<= 256", ""))
            shutil.rmtree(repo, ignore_errors=True)
            vm.stop()
            image.unlink()
    finally:
        for v in vms:
            v.stop()
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    print(f"fleece bench --speed on {os.cpu_count()} cores (load {load[0]:.1f} {load[1]:.1f}), "
          f"repository and copies in {args.dir}, median of {runs} interleaved runs (min-max)\n")
    print_table(rows, (72, 6, 7))


def wall_cpu(*args: str | Path) -> tuple[float, float]:
    """Run a command that must succeed; (wall seconds, its own CPU seconds user + system)."""
    t = time.perf_counter()
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{args[:2]} failed")
    return time.perf_counter() - t, usage.ru_utime + usage.ru_stime


def restore_rows(name: str, runs: int, repo: Path, point_id: str, out: Path,
                 reference: Callable[[], float],
                 other: str | None = None) -> list[tuple[str, str, str, str]]:
    """Restore vs ``reference`` (``nbdcopy --flush`` of the export into ``out``), interleaved.

    Both write the same file durably; the restore's peak RSS is taken from
    one more run. ``other``: another fleece's restore of the same point,
    interleaved too (before/after), with both CPU times.
    """
    builds = {"this": FLEECE} if other is None else {"this": FLEECE, "other": other}
    ref: list[float] = []
    got: dict[str, list[tuple[float, float]]] = {k: [] for k in builds}
    for _ in range(runs):
        ref.append(reference())
        for k, exe in builds.items():
            got[k].append(wall_cpu(exe, "restore", "--repo", repo, point_id, "--drive", "vda",
                                   "--output", out))
            out.unlink()
    r, rs = _median_spread(ref)
    rows = []
    for k, exe in builds.items():
        m, ms = _median_spread([w for w, _ in got[k]])
        cpu = statistics.median(c for _, c in got[k])
        peak, _ = peak_rss(exe, "restore", "--repo", repo, point_id, "--drive", "vda",
                           "--output", out)
        out.unlink()
        label = "" if k == "this" else f" ({exe})"
        rows.append((f"{name}: restore{label} vs nbdcopy --flush", f"{r / m:.2f}", ">= 0.8",
                     f"nbdcopy {r:.2f}s ({rs}), restore {m:.2f}s ({ms}), its CPU {cpu:.2f}s; "
                     f"peak RSS {peak / MiB:.0f} MiB"))
    return rows


def restore_speed(args: argparse.Namespace) -> None:
    """Only the restore rows of ``--speed``: one default full backup of each disk, then the pairs."""
    work = Path(tempfile.mkdtemp(prefix="fleece-bench-restore.", dir=args.dir))
    rows: list[tuple[str, str, str, str]] = []
    try:
        print(f"bench --restore: building two 4 GiB disks in {work} ...", file=sys.stderr)
        for n, (name, (image, _)) in enumerate(build_speed_disks(work).items()):
            vm = VM(work, image, f"restore{n}", fmt="raw")
            out = work / "copy.raw"
            repo = work / f"repo{n}"
            try:
                _, res = fleece_json("backup", "--init", "--qmp", vm.qmp, "--drive", "vda", "--repo", repo)

                def nbdcopy(vm: VM = vm, out: Path = out) -> float:
                    _, exp = fleece_json("export", "start", "--bounded-requests",
                                         "--qmp", vm.qmp, "--drive", "vda")
                    try:
                        return timed("nbdcopy", "--flush", exp["disks"][0]["uri"], out)[0]
                    finally:
                        sh(FLEECE, "export", "stop", "--qmp", vm.qmp, "--abort")
                        out.unlink(missing_ok=True)

                for row in restore_rows(name, args.runs, repo, res["point"], out, nbdcopy,
                                        args.restore_versus):
                    print("bench --restore:", " | ".join(row), file=sys.stderr, flush=True)
                    rows.append(row)
            finally:
                vm.stop()
            image.unlink()
    finally:
        if args.keep:
            print(f"bench --restore: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    print(f"fleece bench --restore on {os.cpu_count()} cores (load {load[0]:.1f} {load[1]:.1f}), "
          f"repository and copies in {args.dir}, median of {args.runs} interleaved runs (min-max)\n")
    print_table(rows, (72, 6, 7))


# -- --peers: the peer row of issue 16 ----------------------------------------------------------

def qemu_backup_job(vm: VM, target: Path, size: int) -> float:
    """QEMU's own full backup job into a new qcow2 ``target``, as qmpbackup drives it; seconds.

    The whole of it: ``qemu-img create``, ``blockdev-add`` of the target,
    ``blockdev-backup`` (sync=full) until ``BLOCK_JOB_COMPLETED``, and
    ``blockdev-del``, which flushes the image to disk as it closes it.
    """
    def qmp(command: str, **arguments: Any) -> None:
        reply = vm.mon.cmd_raw(command, arguments)
        if "error" in reply:
            raise SystemExit(f"bench --peers: {command} failed: {reply['error']}")

    t = time.perf_counter()
    sh("qemu-img", "create", "-q", "-f", "qcow2", target, str(size))
    qmp("blockdev-add", driver="qcow2", **{"node-name": "peer-target"},
        file={"driver": "file", "filename": str(target)})
    qmp("blockdev-backup", **{"job-id": "peer-backup"}, device="fmt-vda", target="peer-target",
        sync="full")
    while True:
        event = vm.mon.pull_event(wait=600.0)
        if event is None:
            raise SystemExit("bench --peers: the QEMU backup job did not finish in 600 s")
        if event["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") \
                and event["data"]["device"] == "peer-backup":
            if event["event"] != "BLOCK_JOB_COMPLETED" or "error" in event["data"]:
                raise SystemExit(f"bench --peers: the QEMU backup job failed: {event}")
            break
    qmp("blockdev-del", **{"node-name": "peer-target"})
    return time.perf_counter() - t


def _du(path: Path) -> int:
    """Bytes allocated under ``path`` (a file or a directory)."""
    return int(sh("du", "-s", "--block-size=1", path).stdout.split()[0])


def _virtnbdbackup_fulls(work: Path, image: Path, runs: int) -> tuple[list[float], int] | str:
    """virtnbdbackup full backups (uncompressed) of ``image`` run by a private libvirtd.

    Returns (seconds of each, bytes of the last) or why it did not run.
    """
    if shutil.which("virtnbdbackup") is None:
        return "not installed (Debian: virtnbdbackup)"
    sys.path.insert(0, str(ROOT / "scripts"))
    sys.path.insert(0, str(ROOT / "tests"))
    from bench_libvirt import delete_checkpoints, start_domain
    from libvirt_host import LibvirtHost

    host = LibvirtHost()
    times, stored = [], 0
    try:
        try:
            name = start_domain(host, work, image)
        except Exception as exc:  # no usable libvirtd here: say so in the table
            return f"libvirt not usable: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        out = work / "virtnbdbackup"
        for _ in range(runs):
            shutil.rmtree(out, ignore_errors=True)
            delete_checkpoints(host, name)
            t, _ = timed("virtnbdbackup", "-U", host.uri, "-d", name, "-o", out, "-l", "full",
                         "-S", work)
            times.append(t)
            stored = _du(out)
        shutil.rmtree(out, ignore_errors=True)
    finally:
        host.stop()
    return times, stored


def peers(args: argparse.Namespace) -> None:
    """fleece's default full backup beside QEMU's backup job, virtnbdbackup and nbdcopy."""
    work = Path(tempfile.mkdtemp(prefix="fleece-bench-peers.", dir=args.dir))
    rows: list[tuple[str, str, str, str]] = []
    runs = args.runs
    vm: VM | None = None
    try:
        print(f"bench --peers: building an ext4 disk from {args.data} in {work} ...", file=sys.stderr)
        image = build_disk(work, Path(args.data), args.disk_size)
        info = json.loads(sh("qemu-img", "info", "--output=json", image).stdout)
        size, data = info["virtual-size"], info["actual-size"]
        vm = VM(work, image, "peers")
        repo, job, copy = work / "repo", work / "job.qcow2", work / "copy.raw"
        mine, plain, jobs, flushed, null = [], [], [], [], []
        stored, read, job_bytes = 0, 0, 0
        for _ in range(runs):
            shutil.rmtree(repo, ignore_errors=True)
            t, res = fleece_json("backup", "--init", "--qmp", vm.qmp, "--drive", "vda", "--repo", repo,
                                 "--level", "full")
            mine.append(t)
            stored, read = _du(repo), res["disks"][0]["bytes_read"]
            shutil.rmtree(repo, ignore_errors=True)
            plain.append(fleece_json("backup", "--init", "--qmp", vm.qmp, "--drive", "vda", "--repo", repo,
                                     "--level", "full", "--compress", "none")[0])
            jobs.append(qemu_backup_job(vm, job, size))
            job_bytes = _du(job)
            job.unlink()
            _, exp = fleece_json("export", "start", "--bounded-requests", "--qmp", vm.qmp, "--drive", "vda")
            uri = exp["disks"][0]["uri"]
            try:
                flushed.append(timed("nbdcopy", "--flush", uri, copy)[0])
                copy.unlink()
                null.append(timed("nbdcopy", uri, "null:")[0])
            finally:
                sh(FLEECE, "export", "stop", "--qmp", vm.qmp, "--abort")
        shutil.rmtree(repo, ignore_errors=True)
        vm.stop()
        m, ms = _median_spread(mine)
        j, js = _median_spread(jobs)
        rows.append(("full backup (defaults) / QEMU backup job to qcow2", f"{m / j:.2f}", "<= 1.5",
                     f"fleece {m:.2f}s ({ms}), job {j:.2f}s ({js})"))
        rows.append(("fleece backup, full, defaults (zstd:1, BLAKE3)", f"{m:.2f}s", "",
                     f"({ms}); reads {read / MiB:.0f} MiB, stores {stored / MiB:.0f} MiB"))
        p, ps = _median_spread(plain)
        rows.append(("fleece backup, full, --compress none", f"{p:.2f}s", "",
                     f"({ps}); {p / j:.2f}x the job"))
        rows.append(("QEMU backup job to qcow2 — what qmpbackup drives", f"{j:.2f}s", "",
                     f"({js}); blockdev-add, blockdev-backup sync=full, blockdev-del; "
                     f"writes {job_bytes / MiB:.0f} MiB"))
        lv = _virtnbdbackup_fulls(work, image, runs)
        if isinstance(lv, str):
            rows.append(("virtnbdbackup -l full (uncompressed), libvirt", "-", "", lv))
        else:
            v, vs = _median_spread(lv[0])
            rows.append(("virtnbdbackup -l full (uncompressed), libvirt", f"{v:.2f}s", "",
                         f"({vs}); writes {lv[1] / MiB:.0f} MiB; same image, run after the others"))
        r, rs = _median_spread(flushed)
        rows.append(("reference: nbdcopy --flush of the export to a file", f"{r:.2f}s", "", f"({rs})"))
        r, rs = _median_spread(null)
        rows.append(("reference: nbdcopy of the export to null:", f"{r:.2f}s", "", f"({rs})"))
    finally:
        if vm is not None:
            vm.stop()
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    print(f"fleece bench --peers on {os.cpu_count()} cores (load {load[0]:.1f} {load[1]:.1f}): "
          f"{size / GiB:.0f} GiB qcow2 disk holding {data / MiB:.0f} MiB (ext4 of {args.data} and "
          f"128 MiB random) in a running QEMU; files in {args.dir}; median of {runs} interleaved "
          "runs (min-max)\n")
    print_table(rows, (52, 7, 7))


def idle_versus(args: argparse.Namespace) -> None:
    """The fixed cost of a run: an incremental with nothing dirty, this fleece vs another, interleaved."""
    work = Path(tempfile.mkdtemp(prefix="fleece-bench-idle.", dir=args.dir))
    builds = {"this": FLEECE, "other": args.idle_versus}
    vms: dict[str, VM] = {}
    times: dict[str, list[float]] = {k: [] for k in builds}
    try:
        for k, exe in builds.items():
            image = work / f"{k}.qcow2"
            sh("qemu-img", "create", "-q", "-f", "qcow2", image, "4G")
            vms[k] = VM(work, image, f"idle-{k}")
            vms[k].write(0, 64 * MiB, 0x55)
            # `init` first: an older build compared against knows no `backup --init`.
            sh(exe, "init", "--repo", work / f"repo-{k}", "--encryption", "none")
            sh(exe, "backup", "--qmp", vms[k].qmp, "--drive", "vda", "--repo", work / f"repo-{k}")
        for _ in range(args.runs):
            for k, exe in builds.items():
                times[k].append(timed(exe, "backup", "--qmp", vms[k].qmp, "--drive", "vda",
                                      "--repo", work / f"repo-{k}", "--level", "incremental",
                                      "--json")[0])
    finally:
        for v in vms.values():
            v.stop()
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    print(f"fleece bench --idle-versus on {os.cpu_count()} cores (load {load[0]:.1f} {load[1]:.1f}): "
          f"incremental of an unchanged 4 GiB disk, wall, {args.runs} interleaved runs each\n")
    for k, exe in builds.items():
        m, spread = _median_spread(times[k])
        print(f"| {exe:<60} | median {m:.3f}s | min-max {spread}s |")


def _run_cpu(*args: str | Path) -> tuple[float, float, dict[str, Any]]:
    """Run a command; return (wall seconds, its own CPU seconds user + system, its JSON output)."""
    t = time.perf_counter()
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{args[:2]} failed")
    return time.perf_counter() - t, usage.ru_utime + usage.ru_stime, json.loads(out)


def full_versus(args: argparse.Namespace) -> None:
    """Full backups of the --speed disks, this fleece vs another, interleaved: wall and CPU."""
    work = Path(tempfile.mkdtemp(prefix="fleece-bench-versus.", dir=args.dir))
    builds = {"this": FLEECE, "other": args.full_versus}
    lines = []
    try:
        print(f"bench --full-versus: building two 4 GiB disks in {work} ...", file=sys.stderr)
        for name, (image, _) in build_speed_disks(work).items():
            vm = VM(work, image, "versus", fmt="raw")
            try:
                for extra in (["--compress", "none"], []):
                    got: dict[str, list[tuple[float, float]]] = {k: [] for k in builds}
                    for _ in range(args.runs):
                        for k, exe in builds.items():
                            shutil.rmtree(work / "repo", ignore_errors=True)
                            sh(exe, "init", "--repo", work / "repo", "--encryption", "none")
                            wall, cpu, _ = _run_cpu(exe, "backup", "--qmp", vm.qmp,
                                                    "--drive", "vda", "--repo", work / "repo",
                                                    "--level", "full",
                                                    "--json", *extra)
                            got[k].append((wall, cpu))
                    for k, exe in builds.items():
                        m, spread = _median_spread([w for w, _ in got[k]])
                        cpu = statistics.median(c for _, c in got[k])
                        line = (f"| {name}, full {' '.join(extra) or '(defaults)'} | {exe} | "
                                f"wall {m:.2f}s ({spread}) | CPU {cpu:.2f}s |")
                        print("bench --full-versus:", line, file=sys.stderr, flush=True)
                        lines.append(line)
            finally:
                vm.stop()
            image.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    print(f"fleece bench --full-versus on {os.cpu_count()} cores (load {load[0]:.1f} {load[1]:.1f}), "
          f"median of {args.runs} interleaved runs (min-max)\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/usr/lib/x86_64-linux-gnu", help="directory to fill the disk with")
    ap.add_argument("--disk-size", default="2G")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--speed", action="store_true",
                    help="only the data-path ratios against nbdcopy and nbdcopy | zstd (issue 16)")
    ap.add_argument("--dir", default="/var/tmp", help="--speed: file system for repositories and copies")
    ap.add_argument("--runs", type=int, default=3, help="--speed: runs of each comparison")
    ap.add_argument("--peers", action="store_true",
                    help="only the peer row: full backup vs QEMU's backup job, virtnbdbackup, nbdcopy")
    ap.add_argument("--restore", action="store_true",
                    help="only the restore rows of --speed (restore vs nbdcopy --flush, peak RSS)")
    ap.add_argument("--restore-versus", metavar="FLEECE",
                    help="--restore: also restore with FLEECE, interleaved (before/after)")
    ap.add_argument("--idle-versus", metavar="FLEECE",
                    help="only the nothing-dirty incremental, this fleece vs FLEECE, interleaved")
    ap.add_argument("--full-versus", metavar="FLEECE",
                    help="only full backups of the --speed disks, this fleece vs FLEECE, interleaved")
    ap.add_argument("--encryption", action="store_true",
                    help="only the encryption rows: backup and restore, each cipher vs plain")
    ap.add_argument("--tls", action="store_true",
                    help="only the TLS section: reads over nbds:// on loopback vs the unix socket")
    ap.add_argument("--live-restore", action="store_true",
                    help="run only the live-restore benchmark (scripts/bench_live.py)")
    args = ap.parse_args()
    sections: list[tuple[object, Callable[[argparse.Namespace], None]]] = [
        (args.live_restore, live_restore_main), (args.full_versus, full_versus),
        (args.idle_versus, idle_versus), (args.speed, speed),
        (args.restore or args.restore_versus, restore_speed), (args.peers, peers)]
    for wanted, section in sections:  # one section alone, or the default bench below
        if wanted:
            section(args)
            return
    work = Path(tempfile.mkdtemp(prefix="fleece-bench."))
    shm = Path(tempfile.mkdtemp(prefix="fleece-bench.", dir="/dev/shm"))
    rows: list[tuple[str, str, str, str]] = []
    vms: list[VM] = []
    try:
        cores = os.cpu_count() or 1
        print(f"bench: building an ext4 disk from {args.data} in {work} ...", file=sys.stderr)
        image = build_disk(work, Path(args.data), args.disk_size)
        vm = VM(work, image, "bench")
        vms.append(vm)
        if args.tls:
            rows.extend(tls_rows(vm, work, shm))
            print_rows(rows, args)
            return
        if args.encryption:
            rows.extend(encryption_rows(vm, work, args.runs))
            print_rows(rows, args)
            return

        # -- I/O path: nbdcopy vs backup --compress none, same export ----------------------
        _, exp = fleece_json("export", "start", "--bounded-requests", "--qmp", vm.qmp, "--drive", "vda")
        uri = exp["disks"][0]["uri"]
        nbd_times = [timed("nbdcopy", uri, "null:")[0] for _ in range(3)]
        nbdcopy_s = statistics.median(nbd_times)
        bound, data_bytes, ratio_3 = compute_bound(uri, 4 * MiB, 3, cores)
        bound1, _, ratio_1 = compute_bound(uri, 4 * MiB, 1, cores)
        # --flush: restore makes its output durable before it says it is done.
        t_copy_file, _ = timed("nbdcopy", "--flush", uri, work / "nbdcopy.raw")
        (work / "nbdcopy.raw").unlink()
        sh(FLEECE, "export", "stop", "--qmp", vm.qmp, "--abort")

        # Every time below is a whole process's, as a user waits for it (nbdcopy's too).
        runs, run_s = [], []
        for _ in range(3):
            dt, res = fleece_json("backup", "--init", "--qmp", vm.qmp, "--drive", "vda", "--repo",
                                  shm / "repo-none", "--compress", "none", "--level", "full",
                                  "--hash", "sha256")
            shutil.rmtree(shm / "repo-none")
            runs.append(res)
            run_s.append(dt)
        b3_runs = []
        for _ in range(3):
            dt, res = fleece_json("backup", "--init", "--qmp", vm.qmp, "--drive", "vda", "--repo",
                                  shm / "repo-b3", "--compress", "none", "--level", "full",
                                  "--hash", "blake3")
            shutil.rmtree(shm / "repo-b3")
            b3_runs.append(dt)
        b3_s = statistics.median(b3_runs)
        io_s = statistics.median(run_s)
        io_path = statistics.median(r["disks"][0]["seconds"] for r in runs)
        read = runs[0]["disks"][0]["bytes_read"]
        rows.append(("I/O path: backup --compress none --hash sha256 vs nbdcopy null:",
                     f"{nbdcopy_s / io_s:.2f}", ">= 0.7",
                     f"nbdcopy {nbdcopy_s:.2f}s ({read / nbdcopy_s / MiB:.0f} MiB/s), backup "
                     f"{io_s:.2f}s ({read / io_s / MiB:.0f} MiB/s; its data path {io_path:.2f}s); "
                     "sha256 binds it (the next row is the default hash)"))
        rows.append(("I/O path, BLAKE3 repository (the default)",
                     f"{nbdcopy_s / b3_s:.2f}", ">= 0.7",
                     f"backup {b3_s:.2f}s ({read / b3_s / MiB:.0f} MiB/s)"))

        # -- compute path: default compression vs hash+zstd on every core --------------------
        full_runs = []
        full_s = []
        cpu_notes = []
        for i in range(3):
            repo_i = shm / f"repo-zstd-{i}" if i < 2 else work / "repo-zstd-2"
            q0 = proc_cpu(vm.proc.pid)
            t0 = time.perf_counter()
            # zstd:3 explicitly: the bound below is zstd-3 (the default is zstd:1 since issue 16).
            own, res = cpu_of(FLEECE, "backup", "--init", "--qmp", vm.qmp, "--drive", "vda", "--repo",
                              repo_i, "--level", "full", "--compress", "zstd:3", "--json")
            full_s.append(time.perf_counter() - t0)
            cpu_notes.append((own, proc_cpu(vm.proc.pid) - q0, full_s[-1]))
            if i < 2:
                shutil.rmtree(repo_i)
            full_runs.append(res)
        full = full_runs[-1]  # into a directory on the local disk: the repository used below
        cpu_s = min(full_s[:2])
        cpu_rate = full["disks"][0]["bytes_read"] / cpu_s
        rows.append(("compute path: backup (zstd:3) vs hash+zstd bound",
                     f"{cpu_rate / bound:.2f}", ">= 0.8",
                     f"bound {bound / MiB:.0f} MiB/s on {cores} cores (zstd-1 {bound1 / MiB:.0f}, "
                     f"ratio {ratio_1:.2f}; zstd-3 ratio {ratio_3:.2f}); backup {cpu_rate / MiB:.0f} MiB/s; "
                     f"CPU during it: fleece {cpu_notes[0][0]:.1f}s, QEMU {cpu_notes[0][1]:.1f}s "
                     f"of {cores * cpu_notes[0][2]:.1f}s"))

        disk_s = full_s[-1]
        stored = full["disks"][0]["bytes_stored"]
        with open(shm / "dd.src", "wb") as f:
            f.write(os.urandom(max(4 * MiB, stored)))
        t_dd, _ = timed("dd", f"if={shm / 'dd.src'}", f"of={work / 'dd.bin'}", "bs=4M",
                        "conv=fsync", "status=none")
        (work / "dd.bin").unlink()
        (shm / "dd.src").unlink()
        rows.append(("full backup (zstd:3) into a directory on the local disk",
                     f"{full['disks'][0]['bytes_read'] / disk_s / MiB:.0f} MiB/s", "",
                     f"stored {stored / MiB:.0f} MiB durably in {disk_s:.2f}s; dd of as many "
                     f"random bytes with fsync: {t_dd:.2f}s"))

        # -- incremental, 1 % dirty -------------------------------------------------------------
        repo = work / "repo-zstd-2"
        size = full["disks"][0]["size"]
        n_chunks = size // (4 * MiB)
        step = max(1, 100)
        for k in range(0, n_chunks, step):  # 1 % of the chunks, 4 MiB of fresh random bytes each
            vm.write_random(k * 4 * MiB, 4 * MiB, work)
        inc_s, inc = fleece_json("backup", "--init", "--qmp", vm.qmp, "--drive", "vda", "--repo", repo)
        assert inc["disks"][0]["level"] == "incremental", inc
        rows.append(("incremental (1 % dirty) / full", f"{inc_s / disk_s:.3f}",
                     "<= 0.05",
                     f"incremental {inc_s:.2f}s reading {inc['disks'][0]['bytes_read'] / MiB:.0f} MiB "
                     f"(stored {inc['disks'][0]['bytes_stored'] / MiB:.0f} MiB), full {disk_s:.2f}s"))

        # -- pause ------------------------------------------------------------------------------------
        pauses = [r["pause_ms"] for r in runs + full_runs + [inc] if r["pause_ms"] is not None]
        rows.append(("guest pause at the snapshot point (ms)", f"{statistics.median(pauses):.1f}",
                     "<= 20", f"max {max(pauses):.1f} over {len(pauses)} backups"))

        # -- restore vs nbdcopy to a file ------------------------------------------------------------
        t_restore, _ = timed(FLEECE, "restore", "--repo", repo, full["point"],
                             "--output", work / "restore.raw")
        (work / "restore.raw").unlink()
        rows.append(("restore to a file vs nbdcopy --flush to a file",
                     f"{t_copy_file / t_restore:.2f}", "",
                     f"nbdcopy {t_copy_file:.2f}s, restore {t_restore:.2f}s (both durable)"))

        # -- encryption: each cipher vs plain, backup and restore (bench_encryption.py) ----------------
        rows.extend(encryption_rows(vm, work, args.runs))

        # -- reverse delta while the guest overwrites ---------------------------------------------
        peak_trim, _ = overwrite_during_backup(vm, work / "repo-delta-1", work / "scratch-trim",
                                               data_bytes, [])
        peak_none, _ = overwrite_during_backup(vm, work / "repo-delta-2", work / "scratch-notrim",
                                               data_bytes, ["--no-trim"])
        rows.append(("reverse-delta peak, trim vs no trim (MiB)",
                     f"{peak_trim / MiB:.0f} / {peak_none / MiB:.0f}", "smaller with trim",
                     "guest rewrites random 4 MiB pieces of its "
                     f"{data_bytes / MiB:.0f} MiB of data during a one-thread backup"))
        vm.stop()

        # -- peak RSS for 4 GiB and 16 GiB virtual disks ----------------------------------------
        rss = []
        for size_name in ("4G", "16G"):
            big = work / f"big-{size_name}.qcow2"
            sh("qemu-img", "create", "-q", "-f", "qcow2", big, size_name)
            v = VM(work, big, f"rss{size_name}")
            vms.append(v)
            total = int(size_name[:-1]) * GiB
            for k in range(16):  # 512 MiB of random data spread over the disk
                v.write_random(k * (total // 16), 32 * MiB, work)
            peak, _ = rss_of(FLEECE, "backup", "--init", "--qmp", v.qmp, "--drive", "vda", "--repo",
                             work / f"repo-rss-{size_name}", "--json")
            rss.append(peak)
            v.stop()
        rows.append(("peak RSS, 4 GiB / 16 GiB disk (MiB)",
                     f"{rss[0] / MiB:.0f} / {rss[1] / MiB:.0f}", "<= 256, flat", ""))
    finally:
        for v in vms:
            v.stop()
        end_work("bench", work, args.keep)
        shutil.rmtree(shm, ignore_errors=True)
    print_rows(rows, args)


def encryption_rows(vm: VM, work: Path, runs: int) -> list[tuple[str, str, str, str]]:
    """The encryption cost rows of scripts/bench_encryption.py, on this bench's VM."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_encryption import encryption_rows as rows

    return rows(vm, work, runs)


def end_work(name: str, work: Path, keep: bool) -> None:
    """The end of a bench run: remove its working directory, or say where ``--keep`` left it."""
    if keep:
        print(f"{name}: kept {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)


def print_table(rows: list[tuple[str, str, str, str]],
                widths: tuple[int, int, int] = (52, 11, 16), title: str | None = None) -> None:
    """A Markdown table of ``(measure, value, goal, notes)`` rows, the way every bench prints,
    under ``title`` (what was measured, and on how many cores) if given."""
    if title:
        print(f"{title}\n")
    w_name, w_value, w_goal = widths
    print(f"| {'measure':<{w_name}} | {'value':>{w_value}} | {'goal':<{w_goal}} | notes")
    print(f"|{'-' * (w_name + 2)}|{'-' * (w_value + 2)}|{'-' * (w_goal + 2)}|------")
    for name, value, goal, notes in rows:
        print(f"| {name:<{w_name}} | {value:>{w_value}} | {goal:<{w_goal}} | {notes}")


def print_rows(rows: list[tuple[str, str, str, str]], args: argparse.Namespace) -> None:
    """The results table (Markdown)."""
    print_table(rows, title=f"fleece bench on {os.cpu_count()} cores, disk {args.disk_size} of {args.data}")


def live_restore_main(args: argparse.Namespace) -> None:
    """Back up the realistic disk and a sparse 16 GiB one, then live-restore each (bench_live.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_live import bench_live

    work = Path(tempfile.mkdtemp(prefix="fleece-bench."))
    vms: list[VM] = []
    try:
        print(f"bench: building an ext4 disk from {args.data} in {work} ...", file=sys.stderr)
        points = []
        image = build_disk(work, Path(args.data), args.disk_size)
        big = work / "big-16G.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", big, "16G")
        for label, img, name in ((args.disk_size, image, "live"), ("16G sparse", big, "live16")):
            vm = VM(work, img, name)
            vms.append(vm)
            if img == big:
                for k in range(16):  # 512 MiB of data spread over the disk
                    vm.write(k * GiB, 32 * MiB, 0x40 + k)
            _, res = fleece_json("backup", "--init", "--qmp", vm.qmp, "--drive", "vda", "--repo",
                                 work / "repo-live")
            points.append((label, work / "repo-live", res["point"], res["disks"][0]["size"]))
            vm.stop()
        rows = bench_live(FLEECE, work, points)
    finally:
        for v in vms:
            v.stop()
        end_work("bench", work, args.keep)
    print_table(rows, (58, 9, 7), title=f"fleece live-restore bench on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
