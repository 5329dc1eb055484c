"""Pseudonymisation: DICOM patient identifiers never leave this module in clear text."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

SALT_ENV = "CXR_VAEGAN_SALT"
# The salt lives outside git (see .gitignore) so that hashes cannot be reversed by a dictionary
# attack from the repository alone; set CXR_VAEGAN_SALT to share one salt across machines.
DEFAULT_SALT_FILE = Path(__file__).resolve().parent.parent / ".phi_salt"


def get_salt(salt_file: Path = DEFAULT_SALT_FILE) -> bytes:
    env = os.environ.get(SALT_ENV)
    if env:
        return env.encode()
    if salt_file.is_file():
        return salt_file.read_bytes().strip()
    salt = secrets.token_hex(16).encode()
    try:
        salt_file.write_bytes(salt)
        salt_file.chmod(0o600)
    except OSError:
        pass  # read-only checkout: a per-process salt still hides the identifier
    return salt


def pseudonymise(identifier: str, salt: bytes | None = None) -> str:
    """Salted HMAC-SHA256 of an identifier, shortened: stable per salt, not reversible."""
    salt = get_salt() if salt is None else salt
    return "p-" + hmac.new(salt, identifier.encode("utf-8"), hashlib.sha256).hexdigest()[:16]
