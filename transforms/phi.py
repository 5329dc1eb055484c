"""Pseudonymisation: DICOM patient identifiers never leave this module in clear text.

The salt comes from ``CXR_VAEGAN_SALT`` when set, otherwise from the file ``CXR_VAEGAN_SALT_FILE``
names (a team points every ingest at one salt file this way), otherwise from ``.phi_salt`` in the
current working directory (git-ignored), created on first use with a message saying so (pseudonyms
made with a new salt differ from those made elsewhere). Creation is atomic and exclusive: a temp
file in the same folder is written and fsynced, then published with ``os.link``, which fails when
the file already exists, so threads and processes racing on a fresh folder all end up with the one
salt that won. A salt shorter than :data:`MIN_SALT_LEN` is refused, never used: an empty salt makes
every pseudonym recomputable from the identifier alone.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

SALT_ENV = "CXR_VAEGAN_SALT"
SALT_FILE_ENV = "CXR_VAEGAN_SALT_FILE"
SALT_FILE_NAME = ".phi_salt"
MIN_SALT_LEN = 16  # bytes in the file, characters in the variable

_lock = threading.Lock()  # one creator at a time within a process; os.link orders processes
_process_salts: dict[str, bytes] = {}  # unwritable folder: one random salt per process and file
_warned: set[str] = set()


class SaltError(ValueError):
    """A salt that exists but must not be used (empty or too short); the message says the fix."""


def default_salt_file() -> Path:
    """The file ``CXR_VAEGAN_SALT_FILE`` names, else ``.phi_salt`` in the current working
    directory, evaluated at call time.

    The salt lives outside git (see .gitignore) so that hashes cannot be reversed by a dictionary
    attack from the repository alone; set CXR_VAEGAN_SALT_FILE (or CXR_VAEGAN_SALT) to share one
    salt across folders and machines."""
    shared = os.environ.get(SALT_FILE_ENV)
    return Path(shared).expanduser() if shared else Path.cwd() / SALT_FILE_NAME


def get_salt(salt_file: str | Path | None = None) -> bytes:
    """The salt: ``CXR_VAEGAN_SALT`` if set, else the salt file (``default_salt_file()`` unless
    given), created atomically when absent. Raises :class:`SaltError` for a short salt."""
    env = os.environ.get(SALT_ENV)
    if env is not None:
        if len(env) < MIN_SALT_LEN:
            raise SaltError(
                f"{SALT_ENV} is set but holds only {len(env)} character(s); a PHI salt needs at least "
                f"{MIN_SALT_LEN}. Set it to a longer random value (e.g. `python -c 'import secrets; "
                f"print(secrets.token_hex(16))'`), or unset it to use the {SALT_FILE_NAME} file"
            )
        return env.encode()
    path = Path(salt_file) if salt_file is not None else default_salt_file()
    with _lock:
        if path.exists():
            return _read_salt_file(path)
        key = str(path.absolute())
        if key in _process_salts:
            return _process_salts[key]
        try:
            salt = _create_salt_file(path)
        except OSError as e:
            # Read-only checkout (or a folder that is not there): a per-process salt still hides
            # the identifier, but pseudonyms will differ from run to run.
            salt = secrets.token_hex(16).encode()
            _process_salts[key] = salt
            if key not in _warned:
                _warned.add(key)
                print(
                    f"warning: cannot create the PHI salt file {path} ({e.strerror or e}); using a "
                    f"random salt for this process only, so patient pseudonyms will not match other "
                    f"runs. Set {SALT_ENV} (at least {MIN_SALT_LEN} characters) or run from a "
                    f"writable folder to keep them stable.",
                    file=sys.stderr,
                )
            return salt
        if salt is None:  # another process published first: use its salt
            return _read_salt_file(path)
        print(
            f"PHI: created a new salt in {path}: patient pseudonyms made with it differ from those "
            f"made with any other salt (another folder, another machine). To give every ingest of a "
            f"team the same pseudonyms, set {SALT_FILE_ENV} to one shared salt file (kept out of git).",
            file=sys.stderr,
        )
        return salt


def _read_salt_file(path: Path, wait_s: float = 1.0) -> bytes:
    # A file made by the O_EXCL fallback (file systems without hard links) is briefly empty
    # while its creator writes it: look again for a moment before calling it broken.
    deadline = time.monotonic() + wait_s
    while True:
        try:
            data = path.read_bytes().strip()
        except OSError as e:
            raise SaltError(
                f"the PHI salt file {path} cannot be read ({e.strerror or e}); fix its permissions, "
                f"or set {SALT_ENV} (at least {MIN_SALT_LEN} characters)"
            ) from e
        if len(data) >= MIN_SALT_LEN or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if len(data) < MIN_SALT_LEN:
        what = "is empty" if not data else f"holds only {len(data)} byte(s)"
        raise SaltError(
            f"the PHI salt file {path} {what}; a salt needs at least {MIN_SALT_LEN} bytes. Delete "
            f"the file (a new random salt is created on the next run; pseudonyms in existing "
            f"manifests will no longer match), or write a longer random value into it, or set "
            f"{SALT_ENV} (at least {MIN_SALT_LEN} characters)"
        )
    return data


def _create_salt_file(path: Path) -> bytes | None:
    """Publish a new random salt at ``path``; None when another process got there first."""
    salt = secrets.token_hex(16).encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        try:
            os.write(fd, salt)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic, and fails if the file exists: first creator wins
        except FileExistsError:
            return None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            return _create_exclusive(path, salt)  # no hard links on this file system
    finally:
        Path(tmp).unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return salt


def _create_exclusive(path: Path, salt: bytes) -> bytes | None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    try:
        os.write(fd, salt)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)
    return salt


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def pseudonymise(identifier: str, salt: bytes | None = None) -> str:
    """Salted HMAC-SHA256 of an identifier, shortened: stable per salt, not reversible.

    Pass the salt from :func:`get_salt` when pseudonymising many identifiers (resolve it once,
    before any worker thread starts); without it, the salt is resolved on each call."""
    salt = get_salt() if salt is None else salt
    if len(salt) < MIN_SALT_LEN:
        raise SaltError(f"refusing to pseudonymise with a {len(salt)}-byte salt (need {MIN_SALT_LEN})")
    return "p-" + hmac.new(salt, identifier.encode("utf-8"), hashlib.sha256).hexdigest()[:16]
