"""Peer identity: an Ed25519 key pair; the peer id is derived from the public key.

The key is kept in a PEM file (PKCS#8, mode 0600) created on first run and reused after, so
a peer keeps its id across restarts.
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

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64

# Domain-separation prefixes: a signature made for one purpose is never valid for another.
DOMAIN_RENDEZVOUS_AUTH = b"peerlearn/rendezvous-auth/v1\x00"
DOMAIN_DIALBACK = b"peerlearn/dialback/v1\x00"
DOMAIN_MODEL = b"peerlearn/model/v1\x00"


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


class Identity:
    """A peer's key pair."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id: str = peer_id_from_public_key(self.public_key)

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
