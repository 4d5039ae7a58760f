"""A STUN binding server (RFC 5389) on UDP: tells each peer the address its packets come from.

Only what a STUN server for ICE needs: a Binding request gets a success response carrying
XOR-MAPPED-ADDRESS (IPv4 and IPv6), SOFTWARE and FINGERPRINT. A request without the magic
cookie comes from an RFC 3489 client: as RFC 5389 section 12.2 asks, it gets MAPPED-ADDRESS
instead (and no FINGERPRINT, which 3489 does not know), with its whole 16-byte transaction id
(the 128 bits after the length, the cookie's place included) echoed; a 3489 CHANGE-REQUEST
with no flag set is a plain request, one asking for another address or port gets a 420 (this
server has one address; RFC 5780 answers so too). Requests of another method get a
400, requests with unknown comprehension-required attributes a 420 (RFC 5389 section 7.3.1).
No authentication: the binding service is public (section 12). Malformed datagrams are
dropped silently and counted by reason in ``StunServer.counters``; nothing a datagram holds can
stop the server.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import enum
import ipaddress
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from struct import pack, unpack
from typing import Any, cast

from rendezvous.ratelimit import KeyedRateLimiter

log = logging.getLogger(__name__)

COOKIE = 0x2112A442
HEADER_LENGTH = 20
FINGERPRINT_XOR = 0x5354554E
FINGERPRINT_LENGTH = 8
MAX_DATAGRAM = 1500
"""Bigger datagrams are dropped unread: a Binding request is a few dozen bytes."""

IPV4_FAMILY = 0x01
IPV6_FAMILY = 0x02


class Class(enum.IntEnum):
    """Message class bits of the message type (section 6)."""

    REQUEST = 0x000
    INDICATION = 0x010
    RESPONSE = 0x100
    ERROR = 0x110


class Method(enum.IntEnum):
    BINDING = 0x001


class StunParseError(ValueError):
    """A datagram is not a well-formed STUN message; ``reason`` names the counter."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# -- attribute codecs (section 15) ----------------------------------------------------------------


def _xor_pad(transaction_id: bytes) -> bytes:
    return pack("!I", COOKIE) + transaction_id


def pack_xor_address(value: tuple[str, int], transaction_id: bytes) -> bytes:
    """XOR-MAPPED-ADDRESS (section 15.2): port ^ cookie >> 16, address ^ (cookie + tid)."""
    ip = ipaddress.ip_address(value[0])
    family = IPV4_FAMILY if ip.version == 4 else IPV6_FAMILY
    pad = _xor_pad(transaction_id)
    xaddr = bytes(a ^ b for a, b in zip(ip.packed, pad, strict=False))
    return pack("!BBH", 0, family, value[1] ^ (COOKIE >> 16)) + xaddr


def unpack_xor_address(data: bytes, transaction_id: bytes) -> tuple[str, int]:
    if len(data) < 4:
        raise StunParseError("bad_attribute", "XOR-MAPPED-ADDRESS shorter than 4 bytes")
    _, family, xport = unpack("!BBH", data[:4])
    size = {IPV4_FAMILY: 4, IPV6_FAMILY: 16}.get(family)
    if size is None or len(data) != 4 + size:
        raise StunParseError("bad_attribute", f"XOR-MAPPED-ADDRESS: family {family}, "
                             f"{len(data)} bytes")
    pad = _xor_pad(transaction_id)
    raw = bytes(a ^ b for a, b in zip(data[4:], pad, strict=False))
    return str(ipaddress.ip_address(raw)), xport ^ (COOKIE >> 16)


def pack_address(value: tuple[str, int]) -> bytes:
    """MAPPED-ADDRESS (section 15.1, RFC 3489 section 11.2.1): the address in the clear."""
    ip = ipaddress.ip_address(value[0])
    family = IPV4_FAMILY if ip.version == 4 else IPV6_FAMILY
    return pack("!BBH", 0, family, value[1]) + ip.packed


def unpack_address(data: bytes) -> tuple[str, int]:
    if len(data) < 4:
        raise StunParseError("bad_attribute", "MAPPED-ADDRESS shorter than 4 bytes")
    _, family, port = unpack("!BBH", data[:4])
    size = {IPV4_FAMILY: 4, IPV6_FAMILY: 16}.get(family)
    if size is None or len(data) != 4 + size:
        raise StunParseError("bad_attribute", f"MAPPED-ADDRESS: family {family}, "
                             f"{len(data)} bytes")
    return str(ipaddress.ip_address(data[4:])), int(port)


def pack_error_code(value: tuple[int, str]) -> bytes:
    return pack("!HBB", 0, value[0] // 100, value[0] % 100) + value[1].encode("utf8")


def unpack_error_code(data: bytes) -> tuple[int, str]:
    if len(data) < 4:
        raise StunParseError("bad_attribute", "ERROR-CODE shorter than 4 bytes")
    _, hundreds, rest = unpack("!HBB", data[:4])
    return hundreds * 100 + rest, data[4:].decode("utf8", "replace")


def pack_unknown_attributes(value: list[int]) -> bytes:
    return b"".join(pack("!H", code) for code in value)


def unpack_unknown_attributes(data: bytes) -> list[int]:
    return [code for (code,) in (unpack("!H", data[i:i + 2]) for i in range(0, len(data) - 1, 2))]


def pack_string(value: str) -> bytes:
    return value.encode("utf8")


def unpack_string(data: bytes) -> str:
    return data.decode("utf8", "replace")


def pack_unsigned(value: int) -> bytes:
    return pack("!I", value)


def unpack_unsigned(data: bytes) -> int:
    if len(data) != 4:
        raise StunParseError("bad_attribute", f"expected 4 bytes, got {len(data)}")
    return int(unpack("!I", data)[0])


def pack_bytes(value: bytes) -> bytes:
    return value


def unpack_bytes(data: bytes) -> bytes:
    return data


@dataclass(frozen=True)
class AttributeEntry:
    code: int
    name: str
    pack: Callable[..., bytes]
    unpack: Callable[..., Any]
    xor: bool = False  # packed/unpacked with the transaction id


ATTRIBUTES: list[AttributeEntry] = [
    AttributeEntry(0x0001, "MAPPED-ADDRESS", pack_address, unpack_address),
    AttributeEntry(0x0003, "CHANGE-REQUEST", pack_unsigned, unpack_unsigned),  # RFC 3489/5780
    AttributeEntry(0x0006, "USERNAME", pack_string, unpack_string),
    AttributeEntry(0x0008, "MESSAGE-INTEGRITY", pack_bytes, unpack_bytes),
    AttributeEntry(0x0009, "ERROR-CODE", pack_error_code, unpack_error_code),
    AttributeEntry(0x000A, "UNKNOWN-ATTRIBUTES", pack_unknown_attributes,
                   unpack_unknown_attributes),
    AttributeEntry(0x0014, "REALM", pack_string, unpack_string),
    AttributeEntry(0x0015, "NONCE", pack_bytes, unpack_bytes),
    AttributeEntry(0x0020, "XOR-MAPPED-ADDRESS", pack_xor_address, unpack_xor_address, xor=True),
    AttributeEntry(0x8022, "SOFTWARE", pack_string, unpack_string),
    AttributeEntry(0x8028, "FINGERPRINT", pack_unsigned, unpack_unsigned),
]
ATTRIBUTES_BY_CODE = {a.code: a for a in ATTRIBUTES}
ATTRIBUTES_BY_NAME = {a.name: a for a in ATTRIBUTES}


CHANGE_IP = 0x04
CHANGE_PORT = 0x02
"""CHANGE-REQUEST flags (RFC 3489 section 11.2.4)."""


def comprehension_required(code: int) -> bool:
    """Attributes 0x0000-0x7FFF must be understood or the request refused (section 15)."""
    return code < 0x8000


def padding(length: int) -> int:
    return -length % 4


def fingerprint(data: bytes) -> int:
    """CRC-32 of the message up to FINGERPRINT, XOR 0x5354554e (section 15.5)."""
    return binascii.crc32(data) ^ FINGERPRINT_XOR


# -- messages (section 6) ---------------------------------------------------------------------


@dataclass
class Message:
    method: int
    message_class: Class
    transaction_id: bytes
    attributes: dict[str, Any] = field(default_factory=dict)
    unknown: list[int] = field(default_factory=list)
    """Codes of received attributes this module does not know, in order."""
    rfc3489: bool = False
    """An RFC 3489 message: no magic cookie, and ``transaction_id`` is the 16 bytes after the
    length (12 bytes otherwise)."""

    def __post_init__(self) -> None:
        want = 16 if self.rfc3489 else 12
        if len(self.transaction_id) != want:
            raise ValueError(f"an RFC {3489 if self.rfc3489 else 5389} transaction id is "
                             f"{want} bytes, got {len(self.transaction_id)}")

    def _head(self, message_type: int, length: int) -> bytes:
        if self.rfc3489:
            return pack("!HH16s", message_type, length, self.transaction_id)
        return pack("!HHI12s", message_type, length, COOKIE, self.transaction_id)

    def __bytes__(self) -> bytes:
        body = b""
        for name, value in self.attributes.items():
            if name == "FINGERPRINT":
                continue
            entry = ATTRIBUTES_BY_NAME[name]
            if entry.xor and self.rfc3489:
                raise ValueError(f"{name} does not exist in RFC 3489 (no magic cookie)")
            v = entry.pack(value, self.transaction_id) if entry.xor else entry.pack(value)
            body += pack("!HH", entry.code, len(v)) + v + bytes(padding(len(v)))
        message_type = _encode_type(self.method, self.message_class)
        if "FINGERPRINT" not in self.attributes:
            return self._head(message_type, len(body)) + body
        head = self._head(message_type, len(body) + FINGERPRINT_LENGTH)
        crc = fingerprint(head + body)
        return head + body + pack("!HHI", ATTRIBUTES_BY_NAME["FINGERPRINT"].code, 4, crc)


def _encode_type(method: int, message_class: Class) -> int:
    # The 12 method bits are interleaved with the 2 class bits (section 6, figure 3).
    return (method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2) | message_class


def _decode_type(message_type: int) -> tuple[int, Class]:
    method = (message_type & 0x000F) | ((message_type & 0x00E0) >> 1) | (
        (message_type & 0x3E00) >> 2
    )
    return method, Class(message_type & 0x0110)


def parse_message(data: bytes) -> Message:
    """Parse one datagram; raise ``StunParseError`` (a ValueError) saying what is wrong.

    A message without the magic cookie is taken as RFC 3489 (``Message.rfc3489``, a 16-byte
    transaction id); its XOR attributes, which need the cookie, count as unknown."""
    if len(data) < HEADER_LENGTH:
        raise StunParseError(
            "short", f"too short: {len(data)} bytes, a STUN header is {HEADER_LENGTH}"
        )
    message_type, length, cookie, transaction_id = unpack("!HHI12s", data[:HEADER_LENGTH])
    if message_type & 0xC000:
        raise StunParseError("not_stun", "the two leading bits of a STUN message must be zero")
    rfc3489 = cookie != COOKIE
    if rfc3489:
        transaction_id = data[4:HEADER_LENGTH]
    if length % 4 or HEADER_LENGTH + length != len(data):
        raise StunParseError(
            "bad_length", f"length field {length} for a datagram of {len(data)} bytes"
        )
    method, message_class = _decode_type(message_type)
    message = Message(method, message_class, transaction_id, rfc3489=rfc3489)
    pos = HEADER_LENGTH
    while pos < len(data):
        if pos + 4 > len(data):
            raise StunParseError("bad_attribute", f"attribute header overruns at offset {pos}")
        code, attr_len = unpack("!HH", data[pos:pos + 4])
        end = pos + 4 + attr_len
        if end + padding(attr_len) > len(data):
            raise StunParseError(
                "bad_attribute", f"attribute {code:#06x} of {attr_len} bytes overruns the message"
            )
        value = data[pos + 4:end]
        if "FINGERPRINT" in message.attributes:
            raise StunParseError("bad_fingerprint", "attribute after FINGERPRINT")
        entry = ATTRIBUTES_BY_CODE.get(code)
        if entry is not None and entry.xor and rfc3489:
            entry = None
        if entry is None:
            message.unknown.append(code)
        elif entry.xor:
            message.attributes[entry.name] = entry.unpack(value, transaction_id)
        else:
            message.attributes[entry.name] = entry.unpack(value)
        if entry is not None and entry.name == "FINGERPRINT":
            expected = fingerprint(data[:pos])
            if message.attributes["FINGERPRINT"] != expected:
                raise StunParseError("bad_fingerprint", "FINGERPRINT does not match")
        pos = end + padding(attr_len)
    return message


# -- a client's Binding transaction (section 7) ------------------------------------------------


def binding_request(transaction_id: bytes | None = None) -> bytes:
    """A bare Binding request (no attributes), with a random transaction id unless given."""
    tid = os.urandom(12) if transaction_id is None else transaction_id
    if len(tid) != 12:
        raise ValueError(f"a STUN transaction id is 12 bytes, got {len(tid)}")
    return bytes(Message(Method.BINDING, Class.REQUEST, tid))


def parse_binding_response(data: bytes, transaction_id: bytes) -> tuple[str, int]:
    """The XOR-MAPPED-ADDRESS of the Binding success response to the request with
    ``transaction_id``, as ``(ip, port)``; ``StunParseError`` (a ValueError) says what is
    wrong."""
    message = parse_message(data)
    if message.rfc3489:
        raise StunParseError("bad_cookie", "not an RFC 5389 response: no magic cookie")
    if message.method != Method.BINDING or message.message_class is not Class.RESPONSE:
        raise StunParseError("not_response", f"not a Binding success response: method "
                             f"{message.method:#05x}, class {message.message_class.name}")
    if message.transaction_id != transaction_id:
        raise StunParseError("wrong_transaction", "STUN transaction id does not match the request")
    address = message.attributes.get("XOR-MAPPED-ADDRESS")
    if address is None:
        raise StunParseError("no_address", "STUN Binding response has no XOR-MAPPED-ADDRESS")
    ip, port = address
    return str(ip), int(port)


# -- the server ---------------------------------------------------------------------------------


def _client_address(addr: tuple[Any, ...]) -> tuple[str, int]:
    """The source of a datagram as (ip, port); an IPv4-mapped IPv6 source is reported as IPv4."""
    host = str(addr[0]).split("%", 1)[0]
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(addr[1])


class StunServer(asyncio.DatagramProtocol):
    """Answers STUN Binding requests on one UDP socket. ``start()`` binds, ``close()`` unbinds.

    ``counters`` counts each datagram exactly once, by outcome: ``answered`` (a success
    response), ``error_400`` / ``error_420`` (an error response was sent),
    ``indication`` (ignored), and one drop reason per ``StunParseError.reason`` plus
    ``not_request``, ``too_large``, ``rate_limited``. ``answered_by_kind`` splits the answered
    ones by client: ``rfc5389`` (XOR-MAPPED-ADDRESS) and ``rfc3489`` (MAPPED-ADDRESS).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        software: str | None = "peerlearn-rendezvous",
        rate_limit: float = 0.0,
        burst: float = 50.0,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.software = software
        self.counters: collections.Counter[str] = collections.Counter()
        self.answered_by_kind: collections.Counter[str] = collections.Counter()
        self._limiter = KeyedRateLimiter(rate_limit, burst) if rate_limit > 0 else None
        self._transport: asyncio.DatagramTransport | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("STUN server not started")
        return self._port

    async def start(self) -> None:
        if self._transport is not None:
            raise RuntimeError("a StunServer is started once")
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=(self.host, self.requested_port)
        )
        self._transport = transport
        self._port = int(transport.get_extra_info("sockname")[1])
        log.info("STUN listening on udp %s:%d", self.host, self._port)

    def close(self) -> None:
        """Stop answering; idempotent."""
        if self._transport is not None:
            self._transport.close()

    # -- DatagramProtocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            reply = self.handle(data, addr)
        except Exception:  # a bug here must cost one datagram, not the server
            log.exception("STUN: failed on a datagram from %s", addr)
            self.counters["internal_error"] += 1
            return
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("STUN socket error: %s", exc)  # e.g. ICMP port unreachable for a reply

    # -- one datagram -> at most one reply -------------------------------------------------

    def handle(self, data: bytes, addr: tuple[Any, ...]) -> bytes | None:
        """The reply to one datagram from ``addr``, or None to drop it (and count why)."""
        if len(data) > MAX_DATAGRAM:
            self.counters["too_large"] += 1
            return None
        try:
            request = parse_message(data)
        except StunParseError as exc:
            self.counters[exc.reason] += 1
            log.debug("STUN: dropped a datagram from %s: %s", addr, exc)
            return None
        if request.message_class is Class.INDICATION:  # e.g. keep-alives (section 7.3.2)
            self.counters["indication"] += 1
            return None
        if request.message_class is not Class.REQUEST:
            self.counters["not_request"] += 1
            return None
        if self._limiter is not None and not self._limiter.allow(str(addr[0]), time.monotonic()):
            self.counters["rate_limited"] += 1
            return None
        unknown = [c for c in request.unknown if comprehension_required(c)]
        if request.attributes.get("CHANGE-REQUEST", 0) & (CHANGE_IP | CHANGE_PORT):
            unknown.append(ATTRIBUTES_BY_NAME["CHANGE-REQUEST"].code)  # one address, one port
        if unknown:
            self.counters["error_420"] += 1
            return self._error(request, 420, "Unknown Attribute", {"UNKNOWN-ATTRIBUTES": unknown})
        if request.method != Method.BINDING:
            self.counters["error_400"] += 1
            return self._error(request, 400, "Bad Request")
        response = Message(Method.BINDING, Class.RESPONSE, request.transaction_id,
                           rfc3489=request.rfc3489)
        if request.rfc3489:  # RFC 5389 section 12.2
            response.attributes["MAPPED-ADDRESS"] = _client_address(addr)
        else:
            response.attributes["XOR-MAPPED-ADDRESS"] = _client_address(addr)
        if self.software:
            response.attributes["SOFTWARE"] = self.software
        if not request.rfc3489:
            response.attributes["FINGERPRINT"] = 0  # computed by __bytes__
        self.counters["answered"] += 1
        self.answered_by_kind["rfc3489" if request.rfc3489 else "rfc5389"] += 1
        return bytes(response)

    def _error(
        self, request: Message, code: int, reason: str, extra: dict[str, Any] | None = None
    ) -> bytes:
        response = Message(request.method, Class.ERROR, request.transaction_id,
                           rfc3489=request.rfc3489)
        response.attributes["ERROR-CODE"] = (code, reason)
        response.attributes.update(extra or {})
        if self.software:
            response.attributes["SOFTWARE"] = self.software
        if not request.rfc3489:
            response.attributes["FINGERPRINT"] = 0
        return bytes(response)
