"""Peer identity: an Ed25519 key pair; the peer id is derived from the public key.

The key is kept in a PEM file (PKCS#8, mode 0600) created on first run and reused after, so
a peer keeps its id across restarts.

The same key also gives the peer its ZeroMQ CURVE (X25519) key pair, the way libsodium
converts keys (``crypto_sign_ed25519_sk_to_curve25519`` / ``..._pk_to_curve25519``): the
secret is SHA-512(Ed25519 seed)[:32], clamped; the public key is the Montgomery
u = (1 + y) / (1 - y) mod 2^255 - 19 of the Edwards point. So anyone who knows a peer's
Ed25519 public key (every member of its job does) knows its CURVE key, with no new message.
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
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
CURVE_KEY_SIZE = 32

_P = 2**255 - 19  # the field of Curve25519 / Ed25519
_D = -121665 * pow(121666, -1, _P) % _P  # the Edwards curve constant d
# u-coordinates of the points of small order on Curve25519 (order 1, 2, 4, 8): a key there
# would give a shared secret an attacker can predict (libsodium refuses them too).
_LOW_ORDER_U = frozenset({
    0,
    1,
    _P - 1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
})

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

    Raises ValueError for a key that is not 32 bytes, whose y is not canonical (>= p), that
    is not a point of the curve, or whose point has small order.
    """
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(
            f"an Ed25519 public key has {PUBLIC_KEY_SIZE} bytes, got {len(public_key)}"
        )
    y = int.from_bytes(public_key, "little") & ((1 << 255) - 1)  # the top bit is x's sign
    if y >= _P:
        raise ValueError("Ed25519 public key: y is not canonical")
    y2 = y * y % _P
    x2 = (y2 - 1) * pow(_D * y2 + 1, -1, _P) % _P
    if x2 != 0 and pow(x2, (_P - 1) // 2, _P) != 1:
        raise ValueError("Ed25519 public key: not a point of the curve")
    if y == 1:
        raise ValueError("Ed25519 public key: small order point")
    u = (1 + y) * pow(1 - y, -1, _P) % _P
    if u in _LOW_ORDER_U:
        raise ValueError("Ed25519 public key: small order point")
    return u.to_bytes(CURVE_KEY_SIZE, "little")


def ed25519_candidates_from_curve(curve_public_key: bytes) -> tuple[bytes, bytes]:
    """The two Ed25519 public keys whose CURVE key is ``curve_public_key``.

    The map above drops the sign of x, so the inverse y = (u - 1) / (u + 1) gives the key
    with either sign bit; look both up. Raises ValueError for a key of the wrong size or a
    u with no y (u = p - 1).
    """
    if len(curve_public_key) != CURVE_KEY_SIZE:
        raise ValueError(
            f"a CURVE public key has {CURVE_KEY_SIZE} bytes, got {len(curve_public_key)}"
        )
    u = int.from_bytes(curve_public_key, "little") % _P
    if u == _P - 1:
        raise ValueError("CURVE public key: u = -1 has no Edwards point")
    y = (u - 1) * pow(u + 1, -1, _P) % _P
    return y.to_bytes(PUBLIC_KEY_SIZE, "little"), (y | 1 << 255).to_bytes(PUBLIC_KEY_SIZE, "little")


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
        scalar = bytearray(hashlib.sha512(seed).digest()[:32])
        scalar[0] &= 248
        scalar[31] &= 127
        scalar[31] |= 64
        self.curve_secret_key: bytes = bytes(scalar)
        """X25519 secret for ZeroMQ CURVE: SHA-512(seed)[:32], clamped (as libsodium)."""
        self.curve_public_key: bytes = (
            X25519PrivateKey.from_private_bytes(self.curve_secret_key).public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )
        """X25519 public key; equals ``curve_public_key_from_ed25519(self.public_key)``."""

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
