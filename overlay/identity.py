"""Peer identity: an Ed25519 key pair; the peer id is derived from the public key.

The key is kept in a PEM file (PKCS#8, mode 0600) created on first run and reused after, so
a peer keeps its id across restarts.

The same key also gives the peer its ZeroMQ CURVE (X25519) key pair, converted by libsodium
(through PyNaCl: ``crypto_sign_ed25519_sk_to_curve25519`` / ``..._pk_to_curve25519``; no curve
arithmetic of our own). So anyone who knows a peer's Ed25519 public key (every member of its
job does) knows its CURVE key, with no new message. The map only runs forwards: to find which
member holds a CURVE key, convert the members' keys and look it up (``overlay.host``).
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from nacl.bindings import (
    crypto_sign_ed25519_pk_to_curve25519,
    crypto_sign_ed25519_sk_to_curve25519,
)
from nacl.exceptions import CryptoError

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
CURVE_KEY_SIZE = 32

_P = 2**255 - 19  # the field of Ed25519: a y at or above it is not a canonical encoding

# Domain-separation prefixes: a signature made for one purpose is never valid for another.
DOMAIN_RENDEZVOUS_AUTH = b"peerlearn/rendezvous-auth/v1\x00"
DOMAIN_DIALBACK = b"peerlearn/dialback/v1\x00"
DOMAIN_MODEL = b"peerlearn/model/v1\x00"
DOMAIN_SIGNAL = b"peerlearn/signal/v1\x00"
DOMAIN_JOB_PROOF = b"peerlearn/job-proof/v1\x00"  # HMAC key: the job's join secret


def peer_id_from_public_key(public_key: bytes) -> str:
    """The peer id: lowercase base32 of the first 20 bytes of SHA-256(public key)."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(
            f"an Ed25519 public key has {PUBLIC_KEY_SIZE} bytes, got {len(public_key)}"
        )
    digest = hashlib.sha256(public_key).digest()[:20]
    return base64.b32encode(digest).decode("ascii").lower()


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True if ``signature`` is a valid Ed25519 signature of ``data`` by ``public_key``."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def curve_public_key_from_ed25519(public_key: bytes) -> bytes:
    """The X25519 (ZeroMQ CURVE) public key of the peer whose Ed25519 public key this is.

    Raises ValueError for a key that is not 32 bytes, whose y is not canonical (>= p), or
    that libsodium refuses (not a point of the curve, a point of small order, or one outside
    the prime-order subgroup: no real key is any of these).
    """
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(
            f"an Ed25519 public key has {PUBLIC_KEY_SIZE} bytes, got {len(public_key)}"
        )
    if int.from_bytes(public_key, "little") & ((1 << 255) - 1) >= _P:  # top bit: x's sign
        raise ValueError("Ed25519 public key: y is not canonical")
    try:
        return bytes(crypto_sign_ed25519_pk_to_curve25519(public_key))
    except (CryptoError, ValueError, TypeError):  # libsodium said no
        raise ValueError("Ed25519 public key: not a point of the curve's prime-order "
                         "subgroup (off the curve or of small order)") from None


class Identity:
    """A peer's key pair (and the CURVE key pair derived from it)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id: str = peer_id_from_public_key(self.public_key)
        seed = private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        self.curve_secret_key: bytes = bytes(
            crypto_sign_ed25519_sk_to_curve25519(seed + self.public_key))
        """X25519 secret for ZeroMQ CURVE (libsodium's conversion: SHA-512(seed)[:32],
        clamped)."""
        self.curve_public_key: bytes = curve_public_key_from_ed25519(self.public_key)
        """X25519 public key (libsodium's conversion of the Ed25519 public key)."""

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the key at ``path``; create it (mode 0600, atomically) if it does not exist."""
        path = Path(path)
        if path.exists():
            data = path.read_bytes()
            try:
                key = serialization.load_pem_private_key(data, password=None)
            except ValueError as exc:
                raise ValueError(f"{path}: not a PEM private key ({exc})") from exc
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path}: not an Ed25519 private key")
            return cls(key)
        identity = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = identity._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process created it meanwhile
        except FileExistsError:
            os.unlink(tmp)
            return cls.load_or_create(path)
        os.unlink(tmp)
        return identity

    def sign(self, data: bytes) -> bytes:
        return self._private_key.sign(data)

    def __repr__(self) -> str:
        return f"Identity({self.peer_id})"
