"""Whole machines (docs/machines.md): a UEFI + TPM libvirt domain recorded with its point,
restored and defined on a real libvirtd (tests/libvirt_host.py), Debian's OVMF and swtpm."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from backups import identical

MiB = 1 << 20
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
NV_INDEX = "0x1500016"
NV_SECRET = b"sealed-to-this-vtpm-0123456789ab"
SAMPLE = Path(__file__).parent / "data" / "sample-repo-v1"

pytestmark = pytest.mark.skipif(
    not (OVMF_CODE.exists() and shutil.which("swtpm") and shutil.which("tpm2_nvwrite")),
    reason="needs ovmf, swtpm and tpm2-tools (scripts/bootstrap installs them)")

DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>{loader}</loader>
    <nvram template='{vars}'>{nvram}</nvram>
  </os>
  <features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{dir}/vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{dir}/sda.qcow2'/>
      <target dev='sda' bus='sata'/>
      <serial>FLEECE-SATA-1</serial>
    </disk>
    <interface type='user'>
      <mac address='52:54:00:aa:bb:cc'/>
      <model type='virtio'/>
    </interface>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_tpm_nv(state: Path) -> None:
    """Make a TPM 2.0 state in ``state`` with ``NV_SECRET`` in NV index ``NV_INDEX`` (swtpm + tpm2-tools)."""
    state.mkdir(parents=True)
    port = _free_port()
    proc = subprocess.Popen(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
                             "--server", f"type=tcp,port={port}", "--ctrl", f"type=tcp,port={port + 1}",
                             "--flags", "not-need-init,startup-clear"])
    try:
        tcti = f"swtpm:host=127.0.0.1,port={port}"
        deadline = time.monotonic() + 30
        while subprocess.run(["tpm2_getrandom", "-T", tcti, "4"], capture_output=True).returncode:
            assert time.monotonic() < deadline, "swtpm did not answer"
            time.sleep(0.1)
        subprocess.run(["tpm2_nvdefine", "-T", tcti, NV_INDEX, "-C", "o", "-s", str(len(NV_SECRET)),
                        "-a", "ownerread|ownerwrite"], check=True, capture_output=True)
        (state.parent / "secret").write_bytes(NV_SECRET)
        subprocess.run(["tpm2_nvwrite", "-T", tcti, NV_INDEX, "-C", "o", "-i", str(state.parent / "secret")],
                       check=True, capture_output=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def read_tpm_nv(state: Path) -> bytes:
    """``NV_INDEX`` of a copy of the TPM state ``state``."""
    copy = state.parent / (state.name + "-read")
    shutil.copytree(state, copy)
    port = _free_port()
    proc = subprocess.Popen(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={copy}",
                             "--server", f"type=tcp,port={port}", "--ctrl", f"type=tcp,port={port + 1}",
                             "--flags", "not-need-init,startup-clear"])
    try:
        tcti = f"swtpm:host=127.0.0.1,port={port}"
        deadline = time.monotonic() + 30
        while True:
            res = subprocess.run(["tpm2_nvread", "-T", tcti, NV_INDEX, "-C", "o"], capture_output=True)
            if res.returncode == 0 or time.monotonic() > deadline:
                return res.stdout
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(copy)


class UefiTpmDomain:
    """A defined + started (paused) UEFI domain with an emulated TPM, two disks on two buses, a NIC."""

    def __init__(self, host: Any, base: Path, name: str, loader: Path = OVMF_CODE) -> None:
        self.host, self.name, self.dir = host, name, base / name
        self.dir.mkdir(parents=True)
        self.uuid = "6a0f1e2d-3c4b-4a59-8e7f-" + os.urandom(6).hex()
        for disk, size in (("vda", 32 * MiB), ("sda", 16 * MiB)):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.dir / f"{disk}.qcow2"),
                            str(size)], check=True)
        # The variable store: the template with bytes of "our" own (as a changed boot entry would be).
        vars_ = bytearray(OVMF_VARS.read_bytes())
        vars_[-4096:-4096 + 16] = b"FLEECE-NVRAM-v1!"
        self.nvram = self.dir / "VARS.fd"
        self.nvram.write_bytes(bytes(vars_))
        self.tpm_state = host.base / "lib" / "swtpm" / self.uuid / "tpm2"
        write_tpm_nv(self.tpm_state)
        xml = DOMAIN.format(name=name, uuid=self.uuid, loader=loader, vars=OVMF_VARS, nvram=self.nvram,
                            dir=self.dir)
        (self.dir / "domain.xml").write_text(xml)
        host.virsh("define", str(self.dir / "domain.xml"))
        host.virsh("start", "--paused", name)

    @property
    def target(self) -> list[str]:
        return ["--libvirt", self.name, "--connect", self.host.uri]

    def write(self, target: str, offset: int, length: int, pattern: int) -> None:
        self.host.virsh("qemu-monitor-command", self.name, "--hmp",
                        f"qemu-io {self._qdev(target)} \"write -P {pattern} {offset} {length}\"")

    def _qdev(self, target: str) -> str:
        blocks = json.loads(self.host.virsh("qemu-monitor-command", self.name,
                                            '{"execute":"query-block"}').stdout)["return"]
        for b in blocks:
            file = (b.get("inserted") or {}).get("file", "")
            if file.endswith(f"/{target}.qcow2"):
                return "-d " + str(b["qdev"])
        raise KeyError(target)

    def close(self) -> None:
        self.host.virsh("destroy", self.name, check=False)
        self.host.virsh("undefine", self.name, "--nvram", "--checkpoints-metadata", "--tpm", check=False)


@pytest.fixture
def swtpm_env(libvirt_host: Any) -> dict[str, str]:
    """fleece runs outside libvirtd's private namespace: tell it where that keeps swtpm state."""
    return {"FLEECE_SWTPM_DIR": str(libvirt_host.base / "lib" / "swtpm")}


@pytest.fixture
def domains(libvirt_host: Any, tmp_path: Path) -> Any:
    made: list[UefiTpmDomain] = []

    def make(name: str, **kw: Any) -> UefiTpmDomain:
        d = UefiTpmDomain(libvirt_host, tmp_path / "domains", f"fl-m{os.getpid()}-{name}", **kw)
        made.append(d)
        return d
    yield make
    for d in made:
        d.close()


def attr(el: ET.Element, path: str, name: str) -> str | None:
    found = el.find(path)
    assert found is not None, path
    return found.get(name)


def undefine(host: Any, name: str) -> None:
    host.virsh("destroy", name, check=False)
    host.virsh("undefine", name, "--nvram", "--tpm", check=False)


def one_line(res: Any, rc: int) -> str:
    assert res.rc == rc, (res.rc, res.out, res.err)
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, res.err
    return str(lines[0])


def test_uefi_tpm_domain_restores_defined_and_started_with_its_nvram_and_tpm_state(
        domains: Any, libvirt_host: Any, fleece: Any, tmp_path: Path, swtpm_env: dict[str, str]) -> None:
    dom = domains("web")
    repo = tmp_path / "repo"
    dom.write("vda", 0, 2 * MiB, 0x41)
    dom.write("sda", 4 * MiB, 1 * MiB, 0x42)
    nvram_then = dom.nvram.read_bytes()
    tpm_then = {f.name: f.read_bytes() for f in dom.tpm_state.iterdir() if not f.name.startswith(".")}
    assert tpm_then

    res = fleece("backup", "--init", "--repo", repo, *dom.target, "--json", env=swtpm_env)
    assert res.rc == 0, res.err
    p1 = res.json()["point"]

    # What the point holds.
    res = fleece("show", "--repo", repo, p1, "--json")
    assert res.rc == 0, res.err
    m = res.json()["machine"]
    assert m["kind"] == "libvirt" and m["machine_type"].startswith("pc-q35") and m["cpus"] == 1
    assert m["memory_bytes"] == 64 * MiB and m["firmware"] == "uefi"
    assert {d["target"]: d["bus"] for d in m["disks"]} == {"vda": "virtio", "sda": "sata"}
    assert [n["mac"] for n in m["nics"]] == ["52:54:00:aa:bb:cc"]
    assert m["tpm"]["backend"] == "emulator" and set(m["files"]) == {"definition", "nvram", "tpm"}
    res = fleece("show", "--repo", repo, p1)
    assert res.rc == 0 and "firmware uefi" in res.out and "serial FLEECE-SATA-1" in res.out, res.out
    res = fleece("show", "--repo", repo, p1, "--definition")
    assert res.rc == 0 and ET.fromstring(res.out).findtext("uuid") == dom.uuid

    # After the backup the machine moves on; the restore brings back the backed-up moment.
    dom.nvram.write_bytes(b"\0" * len(nvram_then))
    dom.write("vda", 0, 2 * MiB, 0x43)

    # An incremental records the machine again at almost no cost.
    res = fleece("backup", "--init", "--repo", repo, *dom.target, "--json", env=swtpm_env)
    assert res.rc == 0, res.err
    p2 = res.json()["point"]
    stats = fleece("list", "--repo", repo, "--json").json()["points"][-1]["stats"]
    assert stats["machine_objects_written"] <= 3, stats
    print("machine recording of an incremental:", stats["machine_seconds"], "s,",
          stats["machine_objects_written"], "objects")

    out = tmp_path / "restored1"
    res = fleece("restore", "--repo", repo, p1, "--machine", "--to", out, "--json")
    assert res.rc == 0, res.err
    assert (out / "nvram.fd").read_bytes() == nvram_then
    assert {f.name: f.read_bytes() for f in (out / "tpm").iterdir()} == tpm_then
    assert read_tpm_nv(out / "tpm") == NV_SECRET
    for disk, pattern in (("vda", 0x41), ("sda", 0x42)):
        raw = tmp_path / f"{disk}.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(out / f"{disk}.qcow2"), str(raw)], check=True)
        data = raw.read_bytes()
        at = 0 if disk == "vda" else 4 * MiB
        length = 2 * MiB if disk == "vda" else MiB
        assert data[at:at + length] == bytes([pattern]) * length
    assert (out / f"{dom.name}.xml").exists()  # a definition for 'virsh define' without --libvirt

    # --define --start under a new name: it starts, on the restored files, with a new identity.
    new = f"{dom.name}-copy"
    out2 = tmp_path / "restored2"
    try:
        res = fleece("restore", "--repo", repo, p1, "--machine", "--to", out2, "--libvirt", new,
                     "--connect", libvirt_host.uri, "--define", "--start", env=swtpm_env)
        assert res.rc == 0, res.err
        assert libvirt_host.virsh("domstate", new).stdout.strip() == "running"
        xml = ET.fromstring(libvirt_host.virsh("dumpxml", new).stdout)
        assert xml.findtext("uuid") != dom.uuid
        assert attr(xml, "./devices/interface/mac", "address") != "52:54:00:aa:bb:cc"
        assert xml.findtext("./os/nvram") == str(out2 / "nvram.fd")
        sources = {attr(d, "target", "dev"): attr(d, "source", "file") for d in xml.findall("./devices/disk")}
        assert sources == {"vda": str(out2 / "vda.qcow2"), "sda": str(out2 / "sda.qcow2")}
        new_state = libvirt_host.base / "lib" / "swtpm" / xml.findtext("uuid") / "tpm2"
        assert (new_state / "tpm2-00.permall").exists()

        # --define onto an existing name: bad input, the files kept and listed, nothing changed.
        out3 = tmp_path / "restored3"
        res = fleece("restore", "--repo", repo, p2, "--machine", "--to", out3, "--libvirt", new,
                     "--connect", libvirt_host.uri, "--define", env=swtpm_env)
        line = one_line(res, 2)
        assert "--replace" in line and str(out3) in line and "nvram.fd" in line
        assert (out3 / "vda.qcow2").exists()
        assert ET.fromstring(libvirt_host.virsh("dumpxml", new).stdout).findtext("uuid") == \
            xml.findtext("uuid")
        # ... and onto a running one even with --replace.
        out4 = tmp_path / "restored4"
        res = fleece("restore", "--repo", repo, p2, "--machine", "--to", out4, "--libvirt", new,
                     "--connect", libvirt_host.uri, "--define", "--replace", env=swtpm_env)
        assert "running" in one_line(res, 2)
        libvirt_host.virsh("destroy", new)
        # The original's UUID is taken while it is defined: --keep-identity is for a lost host.
        out5 = tmp_path / "restored5b"
        res = fleece("restore", "--repo", repo, p2, "--machine", "--to", out5, "--libvirt", new,
                     "--connect", libvirt_host.uri, "--define", "--replace", "--keep-identity",
                     env=swtpm_env)
        assert "already defined with uuid" in one_line(res, 1)
        assert libvirt_host.virsh("domstate", new).stdout.strip() == "shut off"
        dom.close()  # the host is lost
        out5 = tmp_path / "restored5"
        res = fleece("restore", "--repo", repo, p2, "--machine", "--to", out5, "--libvirt", new,
                     "--connect", libvirt_host.uri, "--define", "--replace", "--keep-identity",
                     env=swtpm_env)
        assert res.rc == 0, res.err
        xml5 = ET.fromstring(libvirt_host.virsh("dumpxml", new).stdout)
        assert xml5.findtext("uuid") == dom.uuid
        assert attr(xml5, "./devices/interface/mac", "address") == "52:54:00:aa:bb:cc"
        assert (out5 / "nvram.fd").read_bytes() == b"\0" * len(nvram_then)  # p2's moment
    finally:
        undefine(libvirt_host, new)

    # The machine travels with copy (plain → encrypted: every name changes), survives gc,
    # and verify --deep checks it.
    enc = tmp_path / "enc"
    pw = tmp_path / "pw"
    pw.write_text("machine-secret\n")
    pw.chmod(0o600)
    assert fleece("init", "--repo", enc, "--encryption", "aes-256-gcm", "--passphrase-file", pw).rc == 0
    res = fleece("copy", "--from", repo, "--to", enc, "--to-passphrase-file", pw)
    assert res.rc == 0, res.err
    res = fleece("gc", "--repo", enc, "--passphrase-file", pw, "--grace", "0s")
    assert res.rc == 0, res.err
    res = fleece("verify", "--repo", enc, "--passphrase-file", pw, "--deep")
    assert res.rc == 0, res.out + res.err
    out6 = tmp_path / "restored6"
    res = fleece("restore", "--repo", enc, "--passphrase-file", pw, p1, "--machine", "--to", out6)
    assert res.rc == 0, res.err
    assert (out6 / "nvram.fd").read_bytes() == nvram_then
    assert {f.name: f.read_bytes() for f in (out6 / "tpm").iterdir()} == tpm_then
    for d in (out, out6):
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(d / "sda.qcow2"), str(d / "sda.raw")],
                       check=True)
    assert identical(out / "sda.raw", out6 / "sda.raw")

    # A damaged machine chunk is damage verify names.
    point_doc = json.loads((next((repo / "points").rglob(f"{p1}.json"))).read_text())
    nv = point_doc["machine"]["files"]["nvram"]["chunks"][0]
    chunk = repo / "chunks" / nv[:2] / nv
    chunk.write_bytes(chunk.read_bytes()[:-1] + bytes([chunk.read_bytes()[-1] ^ 1]))
    res = fleece("verify", "--repo", repo, p1, "--deep", "--json")
    assert res.rc == 1
    damage = res.json()["points"][0]["damage"]
    assert [d["disk"] for d in damage] == ["machine:nvram"], damage


def test_a_definition_this_host_cannot_run_is_refused_naming_the_element(
        domains: Any, libvirt_host: Any, fleece: Any, tmp_path: Path, swtpm_env: dict[str, str]) -> None:
    loader = tmp_path / "OVMF_CODE_4M.fd"
    shutil.copy(OVMF_CODE, loader)
    dom = domains("gone", loader=loader)
    repo = tmp_path / "repo"
    res = fleece("backup", "--init", "--repo", repo, *dom.target, "--json", env=swtpm_env)
    assert res.rc == 0, res.err
    loader.unlink()  # the "new host" lacks the firmware the domain was defined with
    out = tmp_path / "restored"
    new = f"{dom.name}-new"
    res = fleece("restore", "--repo", repo, "latest", "--machine", "--to", out, "--libvirt", new,
                 "--connect", libvirt_host.uri, "--define", "--start", env=swtpm_env)
    line = one_line(res, 1)
    assert "<os><loader>" in line and str(loader) in line and str(out) in line, line
    assert libvirt_host.virsh("dominfo", new, check=False).returncode != 0  # nothing defined
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["vda.qcow2", "sda.qcow2", "nvram.fd", "tpm", "recorded-domain.xml", f"{new}.xml"])

    # A disk the point does not hold is left out of the restored definition (it would
    # otherwise run a second domain on the original's image), and said.
    shutil.copy(OVMF_CODE, loader)
    res = fleece("backup", "--init", "--repo", repo, *dom.target, "--drive", "vda", env=swtpm_env)
    assert res.rc == 0, res.err
    out2 = tmp_path / "restored2"
    res = fleece("restore", "--repo", repo, "latest", "--machine", "--to", out2, "--json")
    assert res.rc == 0 and "disk sda is not in point" in res.err, res.err
    assert res.json()["omitted"] == ["sda"]
    xml = ET.fromstring((out2 / f"{dom.name}.xml").read_text())
    assert [attr(d, "target", "dev") for d in xml.findall("./devices/disk")] == ["vda"]


def test_points_without_a_machine_restore_as_before(fleece: Any, tmp_path: Path) -> None:
    repo = tmp_path / "sample"
    shutil.copytree(SAMPLE, repo)
    res = fleece("show", "--repo", repo, "latest")
    assert res.rc == 0 and "no machine recorded" in res.out, res.out + res.err
    assert fleece("show", "--repo", repo, "latest", "--json").json()["machine"] is None
    res = fleece("restore", "--repo", repo, "latest", "--machine", "--to", tmp_path / "m")
    assert "no machine recorded" in one_line(res, 2)
    assert not (tmp_path / "m").exists()
    res = fleece("show", "--repo", repo, "latest", "--definition")
    assert "no machine recorded" in one_line(res, 2)


def test_a_qmp_direct_vm_with_a_pflash_variable_store_restores_to_a_runnable_command_line(
        make_vm: Any, fleece: Any, tmp_path: Path, repo_url: str) -> None:
    vars_ = bytearray(OVMF_VARS.read_bytes())
    vars_[-4096:-4096 + 16] = b"FLEECE-NVRAM-v1!"
    varfile = tmp_path / "VARS.fd"
    varfile.write_bytes(bytes(vars_))
    vm = make_vm([("qcow2", "32M")], name="qmp-uefi", extra_args=[
        "-blockdev", f"driver=file,filename={OVMF_CODE},node-name=code-file,read-only=on",
        "-blockdev", "driver=raw,file=code-file,node-name=pflash0,read-only=on",
        "-blockdev", f"driver=file,filename={varfile},node-name=vars-file",
        "-blockdev", "driver=raw,file=vars-file,node-name=pflash1",
        "-machine", "pflash0=pflash0,pflash1=pflash1"])
    vm.write("vda", 0, MiB, 0x51)

    # Without the variable store among the drives the backup says how to add it.
    res = fleece("backup", "--init", "--qmp", vm.qmp_path, "--drive", "vda", "--repo", repo_url)
    assert res.rc == 0 and "add --drive pflash1" in res.err, res.err
    res = fleece("backup", "--init", "--qmp", vm.qmp_path, "--drive", "vda", "--drive", "pflash1",
                 "--repo", repo_url, "--json")
    assert res.rc == 0, res.err
    point = res.json()["point"]

    m = fleece("show", "--repo", repo_url, point, "--json").json()["machine"]
    assert m["kind"] == "qemu" and m["machine_type"].startswith("pc-q35") and m["cpus"] == 1
    assert m["memory_bytes"] == 64 * MiB and m["firmware"] == "uefi"
    assert m["drives"]["vda"]["model"] == "virtio-blk-device" and m["drives"]["pflash1"]["format"] == "raw"
    argv = json.loads(fleece("show", "--repo", repo_url, point, "--definition").out)["argv"]
    assert argv[0].endswith("qemu-system-x86_64") and "pflash0=pflash0,pflash1=pflash1" in argv

    varfile.write_bytes(b"\0" * len(vars_))  # the machine moves on
    out = tmp_path / "restored"
    res = fleece("restore", "--repo", repo_url, point, "--machine", "--to", out)
    assert res.rc == 0, res.err
    assert (out / "pflash1.raw").read_bytes() == bytes(vars_)
    script = out / "run-qemu.sh"
    text = script.read_text()
    assert str(out / "pflash1.raw") in text and str(out / "vda.qcow2") in text
    assert str(varfile) not in text and vm.qmp_path not in text

    # It runs, beside the original, on the restored files.
    proc = subprocess.Popen([str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (out / "socket1.sock").exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        from qemu.qmp.legacy import QEMUMonitorProtocol
        mon = QEMUMonitorProtocol(str(out / "socket1.sock"))
        mon.connect()
        blocks: Any = mon.cmd("query-block")
        files = {b["inserted"]["file"] for b in blocks if b.get("inserted")}
        mon.close()
        assert {str(out / "pflash1.raw"), str(out / "vda.qcow2")} <= files
    finally:
        proc.kill()
        proc.wait(30)


def test_restore_machine_bad_input_changes_nothing(fleece: Any, tmp_path: Path) -> None:
    repo = tmp_path / "sample"
    shutil.copytree(SAMPLE, repo)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine").write_text("x")
    cases: list[tuple[list[Any], str]] = [
        (["--machine", "--to", busy], "not an empty directory"),
        (["--machine"], "--to"),
        (["--machine", "--to", tmp_path / "a", "--start"], "--libvirt"),
        (["--machine", "--to", tmp_path / "a", "--libvirt", "x", "--start"], "--define"),
        (["--machine", "--to", tmp_path / "a", "--drive", "vda"], "--drive"),
        (["--to", tmp_path / "a", "--output", tmp_path / "o.raw"], "--machine"),
    ]
    for extra, says in cases:
        res = fleece("restore", "--repo", repo, "latest", *map(str, extra))
        assert says in one_line(res, 2), (extra, res.err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "sample"]
    assert [p.name for p in busy.iterdir()] == ["mine"]
