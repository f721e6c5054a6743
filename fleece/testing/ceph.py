"""A throwaway one-node Ceph cluster with a RADOS Gateway on loopback, for the S3 tests.

Ceph RGW is the S3 store most self-hosted sites run, and it differs from
moto and s3rver where fleece cares (it answers 412 to ``If-Match`` even with
the object's current ETag, Ceph 16 and 18 alike). :func:`start_ceph` builds
a cluster from Debian's packages (``ceph-mon``, ``ceph-osd``, ``radosgw``,
``ceph-common``) entirely inside one directory:

* one monitor (``monmaptool --create``, ``ceph-mon --mkfs``) on a free
  loopback port, messenger v2 only;
* one OSD on ``memstore`` (objects live in the OSD's memory, no disk);
* ``auth_*_required = none`` and plain-CRC messenger modes (cephx needs
  keyrings for every daemon and gains a test nothing);
* one ``radosgw`` whose beast frontend listens on two loopback ports, one
  plain HTTP, one HTTPS with a self-signed certificate;
* one S3 user made with ``radosgw-admin user create``.

No manager daemon: nothing the gateway does needs one, and it costs seconds.
The monitor's Paxos proposal interval is cut from 1 s to 10 ms, which takes
the gateway's first start (it creates its pools one command at a time) from
~40 s to a few seconds. :meth:`CephCluster.stop` ends every daemon it started.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fleece.testing.certificates import self_signed_certificate

DAEMONS = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")
ACCESS_KEY = "fleece-ceph-test"
SECRET_KEY = "fleece-ceph-test-secret"
START_TIMEOUT = 120.0
_PR_SET_PDEATHSIG = 1


class CephUnavailable(RuntimeError):
    """The Ceph packages are not installed (``scripts/bootstrap`` installs them)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class CephCluster:
    """A running cluster: where its gateway listens and how to sign requests to it."""

    base: Path
    http_endpoint: str
    https_endpoint: str
    ca_bundle: Path
    version: str
    """``ceph --version``'s release line, e.g. ``16.2.15 pacific``."""
    started_in: float
    """Seconds from nothing to a gateway answering with a user in place."""
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def stop(self) -> None:
        """End the gateway, the OSD and the monitor (in that order) and wait for each."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()


def _conf(base: Path, fsid: str, mon_port: int) -> str:
    return f"""[global]
fsid = {fsid}
mon_host = v2:127.0.0.1:{mon_port}
public_addr = 127.0.0.1
ms_bind_ipv6 = false
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
ms_mon_client_mode = crc
ms_mon_service_mode = crc
ms_mon_cluster_mode = crc
ms_client_mode = crc
ms_service_mode = crc
ms_cluster_mode = crc
run_dir = {base}/run
admin_socket = {base}/run/$name.asok
log_file = {base}/log/$name.log
mon_data = {base}/mon/$cluster-$id
osd_data = {base}/osd/$cluster-$id
mon_data_avail_warn = 1
mon_data_avail_crit = 0
paxos_propose_interval = 0.01
paxos_min_wait = 0.001
osd_objectstore = memstore
memstore_device_bytes = 17179869184
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_max_pg_per_osd = 1000
osd_crush_chooseleaf_type = 0
rgw_enable_usage_log = false
rgw_thread_pool_size = 64
"""


def _run(base: Path, *args: str, timeout: float = 60) -> str:
    done = subprocess.run([*args, "-c", str(base / "ceph.conf")], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


def _die_with_parent() -> None:
    """In the child: SIGKILL when the process that started it dies (a test run killed hard
    leaves no daemon behind on a shared machine)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _daemon(base: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    log = open(base / "log" / f"{name}.out", "wb")  # noqa: SIM115 (closed with the process)
    try:
        return subprocess.Popen([*args, "-c", str(base / "ceph.conf"), "-f"], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent)
    finally:
        log.close()


def _wait(what: str, ready: object, procs: list[subprocess.Popen[bytes]], deadline: float,
          base: Path) -> None:
    assert callable(ready)
    while not ready():
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up ({'exited' if dead else 'timed out'}); "
                               f"logs in {base / 'log'}")
        time.sleep(0.05)


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def start_ceph(base: Path) -> CephCluster:
    """Start a one-node cluster and gateway under ``base`` (see the module docstring).

    Raises :class:`CephUnavailable` when the packages are missing and
    ``RuntimeError`` (with the log directory) when a daemon does not come up;
    nothing is left running then.
    """
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        raise CephUnavailable(f"{', '.join(missing)} not installed: scripts/bootstrap installs "
                              "ceph-mon, ceph-osd, radosgw and ceph-common")
    started = time.monotonic()
    deadline = started + START_TIMEOUT
    for sub in ("run", "log", "mon/ceph-a", "osd/ceph-0"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    fsid = str(uuid.uuid4())
    mon_port, http_port, https_port = _free_port(), _free_port(), _free_port()
    (base / "ceph.conf").write_text(_conf(base, fsid, mon_port))
    version = _run(base, "ceph", "--version").split("version", 1)[-1].split("(")[0].strip()
    key, cert = self_signed_certificate(base, "rgw.key", "rgw.crt", traditional_key=True)
    procs: list[subprocess.Popen[bytes]] = []
    cluster = CephCluster(base, f"http://127.0.0.1:{http_port}", f"https://127.0.0.1:{https_port}",
                          cert, version, 0.0, procs=procs)
    try:
        _run(base, "monmaptool", "--create", "--fsid", fsid, "--addv", "a",
             f"[v2:127.0.0.1:{mon_port}]", str(base / "monmap"))
        _run(base, "ceph-mon", "--mkfs", "-i", "a", "--monmap", str(base / "monmap"))
        procs.append(_daemon(base, "mon", "ceph-mon", "-i", "a"))
        _wait("ceph-mon", lambda: _answers(mon_port), procs, deadline, base)
        osd_uuid = str(uuid.uuid4())
        osd_id = _run(base, "ceph", "osd", "new", osd_uuid).strip()
        _run(base, "ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
        procs.append(_daemon(base, "osd", "ceph-osd", "-i", osd_id))

        def osd_up() -> bool:
            stat = json.loads(_run(base, "ceph", "osd", "stat", "--format", "json"))
            return int(stat.get("num_up_osds", stat.get("osdmap", {}).get("num_up_osds", 0))) >= 1

        _wait("ceph-osd", osd_up, procs, deadline, base)
        frontends = (f"beast endpoint=127.0.0.1:{http_port} ssl_endpoint=127.0.0.1:{https_port} "
                     f"ssl_certificate={cert} ssl_private_key={key}")
        procs.append(_daemon(base, "rgw", "radosgw", "-n", "client.rgw", "--rgw_frontends",
                             frontends))
        _wait("radosgw", lambda: _answers(http_port) and _answers(https_port), procs, deadline, base)
        _run(base, "radosgw-admin", "user", "create", "--uid", "fleece-test", "--display-name",
             "fleece tests", "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY)
    except BaseException:
        cluster.stop()
        raise
    cluster.started_in = time.monotonic() - started
    return cluster


def main() -> None:
    """``python -m fleece.testing.ceph DIR``: start a cluster, print its endpoints, run until ^C."""
    import sys

    base = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fleece-ceph").resolve()
    cluster = start_ceph(base)
    print(f"Ceph {cluster.version} up in {cluster.started_in:.1f} s: {cluster.http_endpoint} "
          f"{cluster.https_endpoint} (CA {cluster.ca_bundle}); keys {ACCESS_KEY} / {SECRET_KEY}")
    with contextlib.suppress(KeyboardInterrupt):
        signal.pause()
    cluster.stop()
    os.sync()


if __name__ == "__main__":
    main()
