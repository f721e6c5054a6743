"""The NBD transport, in one place: where a server listens, how it is secured, how a client connects.

fleece's NBD servers are QEMU's (``fleece export``) and nbdkit
(``fleece serve``); its clients are libnbd handles (``fleece backup``, the
restore to an NBD export). By default a server listens on a unix socket in a
private directory, and nothing else can reach it. A server reachable from
another host listens on TCP and requires TLS, with either

* **x509** certificates, in QEMU's (and nbdkit's, and libnbd's) directory
  layout: ``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem`` on the
  server, ``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem`` on the
  client; the server verifies the client's certificate, and QEMU can also
  allow only one client identity (an ``authz-simple`` object); or
* a **pre-shared key** file of ``USERNAME:HEXKEY`` lines (gnutls's
  ``psktool`` format), the same file on both sides.

Plain TCP is for an isolated network only, and only when asked for with
``--insecure-tcp``. Key files must be private (mode 0600 or stricter), and
no key material is ever logged or printed: only paths and names.

The URIs are the NBD URI standard's: ``nbd+unix:///EXPORT?socket=PATH``,
``nbds://HOST:PORT/EXPORT`` (TLS) and ``nbd://HOST:PORT/EXPORT``.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import nbd

from fleece.errors import BadInput
from fleece.fleecing.names import AUTHZ_OBJECT, TLS_CREDS_OBJECT

X509 = "x509"
PSK = "psk"
CA_CERT = "ca-cert.pem"
SERVER_FILES = (CA_CERT, "server-cert.pem", "server-key.pem")
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
PSK_DIR = "tls-psk"
"""Directory in a fleece export's scratch directory where QEMU finds ``keys.psk``."""
PSK_FILE_IN_DIR = "keys.psk"
"""The name QEMU's ``tls-creds-psk`` reads in its ``dir``."""

_LISTEN_RE = re.compile(r"^tcp:(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d{1,5})$")


def parse_listen(text: str) -> tuple[str, int]:
    """``tcp:HOST:PORT`` (``tcp:[::1]:PORT`` for IPv6) → (host, port); BadInput otherwise."""
    m = _LISTEN_RE.match(text)
    port = int(m.group("port")) if m else 0
    if not m or not 1 <= port <= 65535:
        raise BadInput(f"--listen wants tcp:HOST:PORT (for example tcp:192.0.2.10:10809), "
                       f"not {text!r}; nothing was changed")
    return m.group("v6") or m.group("host"), port


def check_key_file(path: Path, what: str) -> None:
    """Refuse a key file that is missing, not a regular file, or readable by group or others."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BadInput(f"{what} {path}: {exc.strerror}; nothing was changed") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(f"{what} {path} is not a regular file; nothing was changed")
    if st.st_mode & 0o077:
        raise BadInput(f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}: a key must be "
                       f"0600 or stricter (chmod 600 {path}); nothing was changed")


def _check_readable(path: Path, what: str) -> None:
    if not path.is_file():
        raise BadInput(f"{what}: {path} is missing; nothing was changed")


def check_x509_dir(directory: str, side: str) -> str:
    """An absolute x509 credentials directory with ``side``'s files (``server`` or ``client``)."""
    d = Path(os.path.abspath(directory))
    if not d.is_dir():
        raise BadInput(f"--tls-creds {d} is not a directory; nothing was changed")
    _check_readable(d / CA_CERT, "--tls-creds")
    if side == "server":
        _check_readable(d / SERVER_FILES[1], "--tls-creds")
        check_key_file(d / SERVER_FILES[2], "TLS key")
    else:
        have = [(d / f).exists() for f in (CLIENT_CERT, CLIENT_KEY)]
        if any(have) and not all(have):
            raise BadInput(f"--tls-creds {d} needs both {CLIENT_CERT} and {CLIENT_KEY} (or neither); "
                           "nothing was changed")
        if all(have):
            check_key_file(d / CLIENT_KEY, "TLS key")
    return str(d)


def psk_username(path: str) -> str:
    """The user name of the first ``USERNAME:HEXKEY`` line of a PSK file (never the key)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            first = f.readline()
    except OSError as exc:
        raise BadInput(f"--tls-psk {path}: {exc.strerror}; nothing was changed") from None
    name, sep, key = first.strip().partition(":")
    if not sep or not name or not re.fullmatch(r"[0-9A-Fa-f]+", key):
        raise BadInput(f"--tls-psk {path} is not a PSK file of USERNAME:HEXKEY lines (psktool "
                       "makes one); nothing was changed")
    return name


def check_psk_file(path: str) -> str:
    """An absolute, private PSK file with at least one well-formed line."""
    p = os.path.abspath(path)
    check_key_file(Path(p), "--tls-psk")
    psk_username(p)
    return p


@dataclass(frozen=True)
class ServerTransport:
    """Where an NBD server listens and how it secures its connections.

    Exactly one of ``socket`` (a unix socket, the default) and ``host``/``port``
    is set. On TCP, ``tls`` is ``x509`` (``creds`` a directory), ``psk``
    (``creds`` a PSK file) or None: plain TCP, only ever on request.
    """

    socket: str | None = None
    host: str | None = None
    port: int | None = None
    tls: str | None = None
    creds: str | None = None
    authz: str | None = None
    """The one client identity allowed: an x509 certificate's DN, or a PSK user name."""

    @property
    def is_tcp(self) -> bool:
        """Whether the server is reachable over the network."""
        return self.host is not None

    @property
    def insecure(self) -> bool:
        """Plain TCP: anyone who can reach the port reads the disk."""
        return self.is_tcp and self.tls is None

    @property
    def address(self) -> str:
        """``HOST:PORT`` (``[V6]:PORT``), or the socket path."""
        if not self.is_tcp:
            return str(self.socket)
        host = f"[{self.host}]" if ":" in str(self.host) else str(self.host)
        return f"{host}:{self.port}"

    def uri(self, export: str = "") -> str:
        """The NBD URI a client uses for ``export``."""
        name = quote(export, safe="")
        if not self.is_tcp:
            return f"nbd+unix:///{name}?socket={quote(str(self.socket), safe='/')}"
        host = self.host if self.host not in ("0.0.0.0", "::") else socket.gethostname()
        shown = f"[{host}]" if ":" in str(host) else str(host)
        return f"{'nbd' if self.insecure else 'nbds'}://{shown}:{self.port}/{name}"

    def describe(self) -> str:
        """For messages: ``unix socket PATH``, ``TCP HOST:PORT with TLS (x509)``…"""
        if not self.is_tcp:
            return f"unix socket {self.socket}"
        if self.insecure:
            return f"TCP {self.address} WITHOUT TLS (insecure)"
        return f"TCP {self.address} with TLS ({self.tls})"

    def client_credentials(self) -> dict[str, Any]:
        """What a client needs, as paths and names (never key material), for ``--json``."""
        if not self.is_tcp:
            return {"type": "unix", "socket": self.socket}
        out: dict[str, Any] = {"type": "tcp", "address": self.address, "tls": self.tls,
                               "authz": self.authz}
        if self.tls == X509:
            out["ca_cert"] = str(Path(str(self.creds)) / CA_CERT)
            out["client"] = (f"a directory holding {CA_CERT} (this CA), {CLIENT_CERT} signed by it"
                             + (f" with the DN {self.authz}" if self.authz else "")
                             + f" and {CLIENT_KEY} (mode 0600): fleece --tls-creds DIR, "
                             "libnbd set_tls_certificates(DIR), nbdcopy/qemu-img URI "
                             "?tls-certificates=DIR")
        elif self.tls == PSK:
            out["psk_file"] = self.creds
            out["username"] = psk_username(str(self.creds))
            out["client"] = ("the same PSK file (mode 0600): fleece --tls-psk FILE, libnbd "
                             "set_tls_psk_file(FILE) and set_tls_username(USERNAME)")
        else:
            out["client"] = "none: plain TCP, anyone who reaches the port can read the export"
        return out

    def as_dict(self) -> dict[str, Any]:
        """For the export's state file."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ServerTransport:
        """Back from :meth:`as_dict`."""
        return cls(**raw)

    # -- QEMU's NBD server ------------------------------------------------------------
    def qemu_objects(self, psk_dir: str | None = None) -> list[dict[str, Any]]:
        """The ``object-add`` arguments of the TLS credentials and authorization objects.

        Named ``fleece-…`` so that tear-down and ``fleece cleanup`` remove them.
        A PSK server reads ``keys.psk`` in a directory: ``psk_dir`` (see
        :func:`link_psk`).
        """
        if self.tls is None:
            return []
        objects: list[dict[str, Any]] = []
        if self.tls == X509:
            objects.append({"qom-type": "tls-creds-x509", "id": TLS_CREDS_OBJECT, "dir": self.creds,
                            "endpoint": "server", "verify-peer": True})
        else:
            objects.append({"qom-type": "tls-creds-psk", "id": TLS_CREDS_OBJECT, "dir": psk_dir,
                            "endpoint": "server"})
        if self.authz:
            objects.append({"qom-type": "authz-simple", "id": AUTHZ_OBJECT, "identity": self.authz})
        return objects

    def nbd_server_start(self) -> dict[str, Any]:
        """The ``nbd-server-start`` arguments."""
        if not self.is_tcp:
            return {"addr": {"type": "unix", "data": {"path": self.socket}}}
        args: dict[str, Any] = {"addr": {"type": "inet",
                                         "data": {"host": self.host, "port": str(self.port)}}}
        if self.tls:
            args["tls-creds"] = TLS_CREDS_OBJECT
        if self.authz:
            args["tls-authz"] = AUTHZ_OBJECT
        return args

    # -- nbdkit ---------------------------------------------------------------------------
    def nbdkit_args(self) -> list[str]:
        """nbdkit's listening and TLS options (the client's certificate is verified)."""
        if not self.is_tcp:
            return ["--unix", str(self.socket)]
        args = ["--ipaddr", str(self.host), "--port", str(self.port)]
        if self.tls == X509:
            args += ["--tls=require", f"--tls-certificates={self.creds}", "--tls-verify-peer"]
        elif self.tls == PSK:
            args += ["--tls=require", f"--tls-psk={self.creds}"]
        else:
            args += ["--tls=off"]
        return args


def link_psk(transport: ServerTransport, scratch: Path) -> str | None:
    """For a PSK export: ``SCRATCH/tls-psk/keys.psk``, a link to the user's file; the directory.

    QEMU reads ``keys.psk`` in a directory at each handshake; a link (not a
    copy) keeps the key in one place.
    """
    if transport.tls != PSK:
        return None
    d = scratch / PSK_DIR
    d.mkdir(mode=0o700)
    (d / PSK_FILE_IN_DIR).symlink_to(str(transport.creds))
    return str(d)


def server_transport(
    *,
    socket_path: str | None = None,
    listen: str | None = None,
    tls_creds: str | None = None,
    tls_psk: str | None = None,
    tls_authz: str | None = None,
    insecure_tcp: bool = False,
) -> ServerTransport:
    """Check the command line's transport options; the transport, or BadInput before any change."""
    tls = [n for n, v in (("--tls-creds", tls_creds), ("--tls-psk", tls_psk),
                          ("--insecure-tcp", insecure_tcp)) if v]
    if listen is None:
        if tls or tls_authz:
            raise BadInput(f"{tls[0] if tls else '--tls-authz'} needs --listen tcp:HOST:PORT "
                           "(a unix socket needs no TLS); nothing was changed")
        return ServerTransport(socket=socket_path)
    host, port = parse_listen(listen)
    if not tls:
        raise BadInput("--listen tcp: needs --tls-creds DIR or --tls-psk FILE (or, on an isolated "
                       "network only, --insecure-tcp); nothing was changed")
    if len(tls) > 1:
        raise BadInput(f"{' and '.join(tls)} exclude each other; nothing was changed")
    if tls_authz is not None and (insecure_tcp or not tls_authz.strip()):
        raise BadInput("--tls-authz names the one client identity TLS lets in: it needs --tls-creds "
                       "or --tls-psk and a non-empty identity; nothing was changed")
    if tls_creds:
        return ServerTransport(host=host, port=port, tls=X509,
                               creds=check_x509_dir(tls_creds, "server"), authz=tls_authz)
    if tls_psk:
        return ServerTransport(host=host, port=port, tls=PSK, creds=check_psk_file(tls_psk),
                               authz=tls_authz)
    return ServerTransport(host=host, port=port)


# -- the client side (libnbd) -----------------------------------------------------------
class NbdHandle(Protocol):
    """The calls fleece makes on a libnbd handle (``nbd.NBD``); see libnbd(3) for each."""

    def set_handle_name(self, name: str) -> None:
        """Name the handle in libnbd's debug output."""

    def set_pread_initialize(self, request: bool) -> None:
        """Whether libnbd zeroes a read buffer before the read (libnbd 1.12+)."""

    def set_tls(self, tls: int) -> None:
        """``nbd.TLS_DISABLE``, ``TLS_ALLOW`` or ``TLS_REQUIRE``."""

    def set_tls_certificates(self, dir: str) -> None:
        """The x509 directory (``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem``)."""

    def set_tls_verify_peer(self, verify: bool) -> None:
        """Whether the server's certificate must verify against the CA."""

    def set_tls_psk_file(self, filename: str) -> None:
        """A gnutls PSK file of ``USERNAME:HEXKEY`` lines."""

    def set_tls_username(self, username: str) -> None:
        """The PSK identity to present."""

    def add_meta_context(self, name: str) -> None:
        """Ask for a block-status context (``base:allocation``, ``qemu:dirty-bitmap:…``)."""

    def connect_uri(self, uri: str) -> None:
        """Connect and negotiate with the server an NBD URI names."""

    def can_meta_context(self, name: str) -> bool:
        """Whether the server agreed to the context."""

    def get_size(self) -> int:
        """The export's size in bytes."""

    def block_status(self, count: int, offset: int,
                     extent: Callable[[str, int, list[int], Any], int]) -> None:
        """Block status from ``offset``; ``extent(context, offset, [length, flags, …], error)``."""

    def aio_block_status(self, count: int, offset: int,
                         extent: Callable[[str, int, list[int], Any], int]) -> int:
        """:meth:`block_status` without waiting; the command's cookie."""

    def pread(self, count: int, offset: int) -> bytes:
        """Read ``count`` bytes at ``offset``."""

    def pwrite(self, buf: bytes, offset: int) -> None:
        """Write ``buf`` at ``offset`` (a restore onto an NBD export)."""

    def zero(self, count: int, offset: int) -> None:
        """Write ``count`` zero bytes at ``offset`` without sending them."""

    def is_read_only(self) -> bool:
        """Whether the server refuses writes."""

    def can_zero(self) -> bool:
        """Whether the server takes ``zero``."""

    def can_flush(self) -> bool:
        """Whether the server takes ``flush``."""

    def flush(self) -> None:
        """Make what was written durable on the server."""

    def aio_pread(self, buf: object, offset: int) -> int:
        """Start a read into ``buf`` (an ``nbd.Buffer`` or writable buffer); its cookie."""

    def aio_trim(self, count: int, offset: int,
                 completion: Callable[[Any], int] | None = None) -> int:
        """Start a trim; ``completion(error)`` runs when it answers; its cookie."""

    def aio_in_flight(self) -> int:
        """Commands sent and not yet retired."""

    def poll(self, timeout: int) -> int:
        """Run the handle's state machine until something happens (``-1``: wait)."""

    def aio_command_completed(self, cookie: int) -> bool:
        """Retire a finished command, raising its error if it failed."""

    def shutdown(self) -> None:
        """Tell the server goodbye and close the connection."""


@dataclass(frozen=True)
class ClientTls:
    """A libnbd client's TLS credentials: an x509 directory or a PSK file (paths only)."""

    certificates: str | None = None
    psk_file: str | None = None

    def configure(self, h: NbdHandle) -> None:
        """Make handle ``h`` require TLS with these credentials and verify the server."""
        h.set_tls(nbd.TLS_REQUIRE)
        if self.certificates:
            h.set_tls_certificates(self.certificates)
            h.set_tls_verify_peer(True)
        if self.psk_file:
            h.set_tls_psk_file(self.psk_file)
            h.set_tls_username(psk_username(self.psk_file))


def client_tls(tls_creds: str | None, tls_psk: str | None) -> ClientTls | None:
    """Check ``--tls-creds DIR`` / ``--tls-psk FILE`` of a reading or writing side."""
    if tls_creds and tls_psk:
        raise BadInput("--tls-creds and --tls-psk exclude each other; nothing was changed")
    if tls_creds:
        return ClientTls(certificates=check_x509_dir(tls_creds, "client"))
    if tls_psk:
        return ClientTls(psk_file=check_psk_file(tls_psk))
    return None


def is_tls_uri(uri: str) -> bool:
    """Whether ``uri`` asks for TLS (``nbds://``, ``nbds+unix://``…)."""
    return urlsplit(uri).scheme.lower().startswith("nbds")


def check_client_uri(uri: str, tls: ClientTls | None) -> None:
    """Refuse TLS credentials for a URI that does not use TLS (they would be ignored)."""
    if tls is not None and not is_tls_uri(uri):
        raise BadInput(f"--tls-creds/--tls-psk need an nbds:// URI, not {uri}; "
                       "nothing was changed")


def configure_client(h: NbdHandle, uri: str, tls: ClientTls | None) -> None:
    """Set up handle ``h`` for ``uri``: TLS as the URI and ``tls`` say."""
    if tls is not None:
        tls.configure(h)
    elif is_tls_uri(uri):
        # No credentials of ours: libnbd's defaults (the system's CAs) and a verified peer.
        h.set_tls(nbd.TLS_REQUIRE)


__all__ = [
    "ClientTls",
    "NbdHandle",
    "ServerTransport",
    "check_client_uri",
    "check_key_file",
    "client_tls",
    "configure_client",
    "link_psk",
    "parse_listen",
    "server_transport",
]
