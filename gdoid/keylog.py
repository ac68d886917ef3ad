"""Wireshark key-log files (wire.md §7), written only when ``--keylog DIR`` is given.

``DIR`` must belong to the daemon's user and be writable by nobody else (it is
created 0700 when missing); the files are created 0600 and never through a
symlink.

``DIR`` can then be used as ``WIRESHARK_CONFIG_DIR``: ``ikev1_decryption_table``
decrypts Main Mode 5/6 and GROUPKEY-PULL, ``esp_sa`` decrypts the ESP traffic,
``decode_as_entries`` makes UDP 848 ISAKMP.  Wireshark cannot decrypt
GROUPKEY-PUSH (it derives IKEv1 IVs; a push uses the KEK's static IV), so every
KEK goes to ``gdoid_kek_table``, read by ``gdoid decrypt-pcap`` (docs/captures.md).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from gdoid.config.errors import ConfigError
from gdoid.fsutil import write_all
from gdoid.log import get_logger
from gdoid.protocol.constants import GDOI_PORT
from gdoid.protocol.ike_sa import IkeSa
from gdoid.protocol.policy import Kek, Tek

IKE_TABLE = "ikev1_decryption_table"
ESP_TABLE = "esp_sa"
PREFERENCES = "preferences"
DECODE_AS = "decode_as_entries"
KEK_TABLE = "gdoid_kek_table"  # ours, not Wireshark's: read by gdoid decrypt-pcap
KEK_CIPHER = "AES-CBC"  # the only KEK algorithm gdoid sends or accepts (KEK_ALG_AES)

_log = get_logger("gdoid.keylog")

_PREFS = """# written by gdoid --keylog
esp.enable_encryption_decode: TRUE
esp.enable_authentication_check: TRUE
"""


_KEK_HEADER = "# gdoid KEK table (docs/wire.md): KEK SPI (CKY-I|CKY-R),cipher,key,IV\n"


def decode_as_text(port: int = GDOI_PORT) -> str:
    """Wireshark's Decode As table: UDP ``port`` is ISAKMP (Wireshark knows only 500 and 4500)."""
    return f"# written by gdoid --keylog: GDOI uses UDP {port}\ndecode_as_entry: udp.port,{port},(none),ISAKMP\n"


def kek_line(kek: Kek) -> str:
    return f"{kek.spi.hex()},{KEK_CIPHER},{kek.key.hex()},{kek.iv.hex()}\n"


def ikev1_line(sa: IkeSa) -> str:
    return f"{sa.initiator_cookie.hex()},{sa.cipher_key.hex()}\n"


def esp_sa_line(tek: Tek) -> str:
    t = tek.policy.transform
    spi = f"0x{tek.spi:08x}"
    # Wireshark matches a row only for ESP of its family: an "IPv4" row decrypts no ESPv6.
    family = f"IPv{tek.policy.selector.src.version}"
    if t.is_gcm:
        return (
            f'"{family}","*","*","{spi}","AES-GCM with 16 octet ICV [RFC4106]",'
            f'"0x{tek.cipher_key.hex()}","NULL",""\n'
        )
    return (
        f'"{family}","*","*","{spi}","AES-CBC [RFC3602]","0x{tek.cipher_key.hex()}",'
        f'"HMAC-SHA-256-128 [RFC4868]","0x{tek.integrity_key.hex()}"\n'
    )


class KeylogError(ConfigError):
    """``--keylog DIR`` is unsafe or unusable; the daemon refuses to start."""

    def __init__(self, message: str) -> None:
        super().__init__("keylog", message)


def _open_directory(directory: Path) -> int:
    """Open (creating it 0700 if missing) and vet the key-log directory.

    The directory must belong to the daemon's user and be writable by no one
    else: anyone who can create entries in it could plant a symlink or a
    readable file that the keys would then be written to.  The returned
    descriptor pins the directory, so renaming it away later changes nothing.
    """
    try:
        directory.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise KeylogError(f"cannot create {directory}: {exc.strerror}") from None
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise KeylogError(f"{directory} is not a directory (symlinks are refused)") from None
        raise KeylogError(f"cannot open {directory}: {exc.strerror}") from None
    st = os.fstat(fd)
    problem = None
    if st.st_uid != os.geteuid():
        problem = f"is owned by uid {st.st_uid}, not by the daemon's user (uid {os.geteuid()})"
    elif st.st_mode & 0o022:
        problem = f"has mode {stat.S_IMODE(st.st_mode):04o}: must not be group/world-writable"
    if problem is not None:
        os.close(fd)
        raise KeylogError(f"{directory} {problem} (use a private directory, e.g. mode 0700)")
    return fd


class KeyLog:
    """Appends key lines to files in a private directory, owner-only (they hold keys).

    Every file is opened relative to the vetted directory with ``O_NOFOLLOW``:
    a symlink in place of a key file is never followed, the line is dropped
    and the refusal logged.
    """

    def __init__(self, directory: Path, port: int = GDOI_PORT) -> None:
        self.directory = directory
        self._dir_fd = _open_directory(directory)
        self._esp_spis: set[int] = set()
        self._kek_spis: set[bytes] = set()
        self._warned: set[str] = set()
        for name in (PREFERENCES, DECODE_AS, IKE_TABLE, ESP_TABLE, KEK_TABLE):
            self._check_entry(name)
        # Written once; an operator's own edits (another port, say) are kept.
        for name, text in (
            (PREFERENCES, _PREFS),
            (DECODE_AS, decode_as_text(port)),
            (KEK_TABLE, _KEK_HEADER),
        ):
            try:
                os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                self._append(name, text)

    def _check_entry(self, name: str) -> None:
        """Refuse at startup what _append would refuse later (a symlink, a FIFO...)."""
        try:
            st = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode):
            raise KeylogError(
                f"{self.directory / name} is not a regular file (symlinks are refused)"
            )
        if st.st_uid != os.geteuid():
            raise KeylogError(
                f"{self.directory / name} is owned by uid {st.st_uid}, not by the daemon's user"
            )

    def _append(self, name: str, line: str) -> None:
        flags = (
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        )
        try:
            fd = os.open(name, flags, 0o600, dir_fd=self._dir_fd)
        except OSError as exc:
            self._refused(name, exc.strerror or str(exc))
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                self._refused(name, "not a regular file of the daemon's user")
                return
            if st.st_mode & 0o077:  # e.g. made by an older version under a loose umask
                os.fchmod(fd, 0o600)
            write_all(fd, line.encode())
        except OSError as exc:
            self._refused(name, exc.strerror or str(exc))
        finally:
            os.close(fd)

    def _refused(self, name: str, error: str) -> None:
        # Once per file: a registration storm must not become a log storm.
        if name not in self._warned:
            self._warned.add(name)
            _log.error("keylog_write_refused", file=str(self.directory / name), error=error)

    def close(self) -> None:
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def ike(self, sa: IkeSa) -> None:
        self._append(IKE_TABLE, ikev1_line(sa))

    def esp(self, tek: Tek) -> None:
        if tek.spi in self._esp_spis:
            return
        self._esp_spis.add(tek.spi)
        self._append(ESP_TABLE, esp_sa_line(tek))

    def kek(self, kek: Kek | None) -> None:
        """Every KEK the KS creates or the GM installs: what decrypt-pcap needs for pushes."""
        if kek is None or kek.spi in self._kek_spis:
            return
        self._kek_spis.add(kek.spi)
        self._append(KEK_TABLE, kek_line(kek))

    def group_keys(self, kek: Kek | None, teks: Iterable[Tek]) -> None:
        self.kek(kek)
        for t in teks:
            self.esp(t)
