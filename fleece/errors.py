"""The exception hierarchy: every failure fleece reports is a ``FleeceError``.

Each message says what happened and what state was left behind; the CLI
prints it as one line. ``exit_code`` follows the command-line contract:
2 for bad usage or input, 1 for an operation that failed.
"""


class FleeceError(Exception):
    """Base of every error fleece raises on purpose."""

    exit_code = 1


class BadInput(FleeceError):
    """The user asked for something that cannot be: unknown drive, bad URL, bad option."""

    exit_code = 2


class NotARepository(BadInput):
    """``--repo`` names a location that holds no fleece repository (no ``config``)."""


class RepositoryExists(BadInput):
    """A repository was to be created where one exists already."""


class QmpConnectError(FleeceError):
    """The QMP socket is missing, refuses us, or is not a QMP server."""

    exit_code = 1


class QmpCommandError(FleeceError):
    """QEMU refused a QMP command; the message carries QEMU's own reason."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QEMU refused {command}: {desc} ({error_class})")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QmpProtocolError(FleeceError):
    """QEMU answered a QMP command in a shape fleece does not know (an object for a list…)."""

    def __init__(self, command: str, expected: str, answer: object) -> None:
        super().__init__(f"QEMU answered {command} with {type(answer).__name__}, not {expected}; "
                         "nothing was changed by reading it")
        self.command = command


class LeftoversPresent(FleeceError):
    """A previous fleece run left nodes, exports or bitmaps behind."""


class ExportError(FleeceError):
    """Setting up, reading or tearing down the point-in-time export failed."""


class RepositoryError(FleeceError):
    """The repository could not be read or written."""


class RepositoryCorrupt(RepositoryError):
    """An object in the repository is missing or fails its checksum."""


class LockHeld(RepositoryError):
    """Another writer holds the lock we need."""


class RepositoryChanged(BadInput):
    """The repository is not what this host saw last (lost its encryption, another key, another
    repository at the location, newest points gone): refused until ``--accept-change``."""
