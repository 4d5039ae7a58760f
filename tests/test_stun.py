"""The STUN binding server, queried by aioice's STUN client and by hand-built datagrams."""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import os
import shutil
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import pytest
from aioice import stun as aioice_stun

from rendezvous import run_rendezvous, stun
from rendezvous.stun import (
    COOKIE,
    Class,
    Message,
    Method,
    StunParseError,
    StunServer,
    parse_message,
)

WAIT = 2.0


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class _Client(asyncio.DatagramProtocol):
    """A UDP socket speaking aioice's STUN: ``Transaction`` does the retransmissions."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.transactions: dict[bytes, aioice_stun.Transaction] = {}
        self.raw: asyncio.Queue[bytes] = asyncio.Queue()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        with contextlib.suppress(ValueError):
            message = aioice_stun.parse_message(data)
            transaction = self.transactions.pop(message.transaction_id, None)
            if transaction is not None:
                transaction.response_received(message, addr[:2])
                return
        self.raw.put_nowait(data)  # what no transaction of ours waits for

    def send_stun(self, message: aioice_stun.Message, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(bytes(message), addr)

    async def binding(self, server: tuple[str, int]) -> aioice_stun.Message:
        request = aioice_stun.Message(
            message_method=aioice_stun.Method.BINDING, message_class=aioice_stun.Class.REQUEST
        )
        request.add_fingerprint()
        transaction = aioice_stun.Transaction(request, server, self, retransmissions=2)
        self.transactions[request.transaction_id] = transaction
        response, _ = await asyncio.wait_for(transaction.run(), WAIT)
        return response

    @property
    def sockname(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port


@contextlib.asynccontextmanager
async def udp_client(host: str = "127.0.0.1") -> AsyncIterator[_Client]:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(_Client, local_addr=(host, 0))
    try:
        yield client
    finally:
        transport.close()


@contextlib.asynccontextmanager
async def stun_server(host: str = "127.0.0.1", **kw: Any) -> AsyncIterator[StunServer]:
    server = StunServer(host, 0, **kw)
    await server.start()
    try:
        yield server
    finally:
        server.close()
        server.close()  # idempotent


def binding_request(transaction_id: bytes | None = None, body: bytes = b"") -> bytes:
    tid = transaction_id or os.urandom(12)
    return struct.pack("!HHI12s", 0x0001, len(body), COOKIE, tid) + body


async def no_reply(client: _Client, timeout: float = 0.2) -> bool:
    try:
        await asyncio.wait_for(client.raw.get(), timeout)
    except TimeoutError:
        return True
    return False


# -- a standard client gets its address -------------------------------------------------------


async def test_aioice_client_gets_its_mapped_address() -> None:
    async with run_rendezvous() as rendezvous, udp_client() as client:
        assert rendezvous.stun_port is not None and rendezvous.stun_port > 0
        response = await client.binding(("127.0.0.1", rendezvous.stun_port))
        assert response.message_class == aioice_stun.Class.RESPONSE
        assert response.attributes["XOR-MAPPED-ADDRESS"] == client.sockname
        assert response.attributes["SOFTWARE"] == rendezvous.config.server_name
        assert "FINGERPRINT" in response.attributes  # aioice checked its value when parsing
        assert rendezvous.stun is not None and rendezvous.stun.counters["answered"] == 1


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_mapped_address() -> None:
    async with stun_server("::1") as server, udp_client("::1") as client:
        response = await client.binding(("::1", server.port))
        assert response.attributes["XOR-MAPPED-ADDRESS"] == client.sockname


async def test_hand_built_request_and_response_bytes() -> None:
    async with stun_server() as server, udp_client() as client:
        assert client.transport is not None
        tid = bytes(range(12))
        client.transport.sendto(binding_request(tid), ("127.0.0.1", server.port))
        data = await asyncio.wait_for(client.raw.get(), WAIT)
        msg_type, length, cookie, got_tid = struct.unpack("!HHI12s", data[:20])
        assert (msg_type, cookie, got_tid, len(data)) == (0x0101, COOKIE, tid, 20 + length)
        # XOR-MAPPED-ADDRESS by hand (RFC 5389 section 15.2).
        host, port = client.sockname
        attr_type, attr_len, _, family, xport = struct.unpack("!HHBBH", data[20:28])
        assert (attr_type, attr_len, family) == (0x0020, 8, 1)
        assert xport ^ (COOKIE >> 16) == port
        xaddr = struct.unpack("!I", data[28:32])[0] ^ COOKIE
        assert socket.inet_ntoa(struct.pack("!I", xaddr)) == host
        # FINGERPRINT last, CRC-32 of everything before it, XOR 0x5354554e.
        fp_type, fp_len, crc = struct.unpack("!HHI", data[-8:])
        assert (fp_type, fp_len) == (0x8028, 4)
        assert crc == binascii.crc32(data[:-8]) ^ 0x5354554E
        assert parse_message(data).attributes["XOR-MAPPED-ADDRESS"] == (host, port)


def test_message_round_trip_and_precise_errors() -> None:
    tid = os.urandom(12)
    msg = Message(Method.BINDING, Class.RESPONSE, tid, {"XOR-MAPPED-ADDRESS": ("fd00::7", 9)})
    msg.attributes["FINGERPRINT"] = 0
    parsed = parse_message(bytes(msg))
    assert parsed.attributes["XOR-MAPPED-ADDRESS"] == ("fd00::7", 9)
    assert (parsed.method, parsed.message_class, parsed.transaction_id) == (
        Method.BINDING, Class.RESPONSE, tid)
    # aioice agrees on every byte.
    assert aioice_stun.parse_message(bytes(msg)).attributes["XOR-MAPPED-ADDRESS"] == ("fd00::7", 9)

    good = bytes(msg)
    cases = {
        "short": good[:19],
        "bad_length": good[:-1],
        "bad_fingerprint": good[:-1] + bytes([good[-1] ^ 1]),
        "not_stun": b"\xc0" + good[1:],
    }
    for reason, data in cases.items():
        with pytest.raises(StunParseError) as info:
            parse_message(data)
        assert info.value.reason == reason and isinstance(info.value, ValueError)
    # Without the magic cookie it is an RFC 3489 message with a 16-byte transaction id (whose
    # FINGERPRINT, over the changed header, now fails).
    with pytest.raises(StunParseError) as info:
        parse_message(good[:4] + bytes(4) + good[8:])
    assert info.value.reason == "bad_fingerprint"
    body = good[20:-8]  # the same attributes, FINGERPRINT cut
    classic = parse_message(struct.pack("!HH", 0x0101, len(body)) + bytes(4) + tid + body)
    assert classic.rfc3489 and classic.transaction_id == bytes(4) + tid
    assert "XOR-MAPPED-ADDRESS" not in classic.attributes  # meaningless without the cookie
    assert classic.unknown == [0x0020]
    with pytest.raises(ValueError, match="16 bytes"):
        Message(Method.BINDING, Class.REQUEST, tid, rfc3489=True)


# -- what is not a binding request ---------------------------------------------------------


def _overrun() -> bytes:
    # The header says 8 bytes of attributes; the one attribute claims 100.
    return binding_request(body=struct.pack("!HH", 0x8022, 100) + b"abcd")


MALFORMED: list[tuple[str, bytes, str]] = [
    ("random bytes", bytes.fromhex("8f3a") + os.urandom(60), "not_stun"),
    ("truncated header", binding_request()[:12], "short"),
    ("3489: huge length field", struct.pack("!HH16s", 1, 0xFFFC, os.urandom(16)), "bad_length"),
    ("huge length field", struct.pack("!HHI12s", 1, 0xFFFC, COOKIE, os.urandom(12)),
     "bad_length"),
    ("length not a multiple of 4", binding_request(body=b"\x80\x22\x00\x01x"),
     "bad_length"),
    ("attribute overruns", _overrun(), "bad_attribute"),
    ("a response", struct.pack("!HHI12s", 0x0101, 0, COOKIE, os.urandom(12)), "not_request"),
    ("an indication", struct.pack("!HHI12s", 0x0011, 0, COOKIE, os.urandom(12)), "indication"),
    ("too large", binding_request(body=b"\x80\x22\x07\xd0" + bytes(2000)), "too_large"),
]


async def test_malformed_datagrams_are_dropped_counted_and_harmless() -> None:
    async with stun_server() as server, udp_client() as client:
        assert client.transport is not None
        for name, data, reason in MALFORMED:
            before = server.counters[reason]
            client.transport.sendto(data, ("127.0.0.1", server.port))
            assert await no_reply(client), name
            assert server.counters[reason] == before + 1, name
            # ... and the next valid request is answered.
            response = await client.binding(("127.0.0.1", server.port))
            assert response.attributes["XOR-MAPPED-ADDRESS"] == client.sockname, name
        assert server.counters["answered"] == len(MALFORMED)


async def test_other_methods_and_unknown_attributes_get_errors() -> None:
    async with stun_server() as server, udp_client() as client:
        assert client.transport is not None
        allocate = aioice_stun.Message(aioice_stun.Method.ALLOCATE, aioice_stun.Class.REQUEST)
        client.transport.sendto(bytes(allocate), ("127.0.0.1", server.port))
        reply = aioice_stun.parse_message(await asyncio.wait_for(client.raw.get(), WAIT))
        assert reply.message_class == aioice_stun.Class.ERROR
        assert reply.attributes["ERROR-CODE"][0] == 400
        assert reply.transaction_id == allocate.transaction_id

        # CHANGE-REQUEST (0x0003) asking for another address or port: this server has one of
        # each, so 420 (RFC 5780); with no flag set it is a plain request (below).
        change = binding_request(body=struct.pack("!HHI", 0x0003, 4, 0x06))
        client.transport.sendto(change, ("127.0.0.1", server.port))
        data = await asyncio.wait_for(client.raw.get(), WAIT)
        reply_msg = parse_message(data)
        assert reply_msg.message_class is Class.ERROR
        assert reply_msg.attributes["ERROR-CODE"][0] == 420
        assert reply_msg.attributes["UNKNOWN-ATTRIBUTES"] == [0x0003]
        # An unknown comprehension-optional attribute is ignored.
        optional = binding_request(body=struct.pack("!HHI", 0x8050, 4, 0))
        client.transport.sendto(optional, ("127.0.0.1", server.port))
        data = await asyncio.wait_for(client.raw.get(), WAIT)
        assert parse_message(data).message_class is Class.RESPONSE
        no_change = binding_request(body=struct.pack("!HHI", 0x0003, 4, 0))
        client.transport.sendto(no_change, ("127.0.0.1", server.port))
        data = await asyncio.wait_for(client.raw.get(), WAIT)
        assert parse_message(data).attributes["XOR-MAPPED-ADDRESS"] == client.sockname
        # An unknown comprehension-required one still gets its 420.
        unknown = binding_request(body=struct.pack("!HHI", 0x0033, 4, 0))
        client.transport.sendto(unknown, ("127.0.0.1", server.port))
        data = await asyncio.wait_for(client.raw.get(), WAIT)
        assert parse_message(data).attributes["UNKNOWN-ATTRIBUTES"] == [0x0033]
        assert server.counters["error_400"] == 1 and server.counters["error_420"] == 2
        assert server.counters["answered"] == server.answered_by_kind["rfc5389"] == 2


async def test_per_source_rate_limit() -> None:
    async with stun_server(rate_limit=1.0, burst=3) as server, udp_client() as client:
        assert client.transport is not None
        for _ in range(5):
            client.transport.sendto(binding_request(), ("127.0.0.1", server.port))
        answers = 0
        while not await no_reply(client, 0.3):
            answers += 1
        assert answers == 3 and server.counters["rate_limited"] == 2


async def test_stun_port_zero_disabled_and_healthz() -> None:
    async with run_rendezvous(stun_port=None) as server:
        assert server.stun_port is None and server.stun is None
    async with run_rendezvous(stun_port=-1) as server:
        assert server.stun_port is None
    async with run_rendezvous() as server:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{server.port}/healthz") as resp:
                body = await resp.json()
        assert body["stun"] == {"port": server.stun_port, "counters": {}, "answered_by_kind": {}}


async def test_stun_port_taken_fails_start_cleanly() -> None:
    async with stun_server() as taken:
        with pytest.raises(OSError):
            async with run_rendezvous(stun_port=taken.port):
                pass


# -- the client side, as the NAT lab uses it ----------------------------------------------------


async def test_client_binding_request_and_response() -> None:
    tid = bytes(range(12))
    request = stun.binding_request(tid)
    assert request == struct.pack("!HHI", 0x0001, 0, COOKIE) + tid  # a bare Binding request
    assert len(stun.binding_request()) == 20 and stun.binding_request() != stun.binding_request()
    with pytest.raises(ValueError, match="12 bytes"):
        stun.binding_request(b"short")
    async with stun_server() as server, udp_client() as client:
        assert client.transport is not None
        client.transport.sendto(request, ("127.0.0.1", server.port))
        reply = await asyncio.wait_for(client.raw.get(), WAIT)
    assert stun.parse_binding_response(reply, tid) == client.sockname
    refusals = [
        ((reply, bytes(12)), "wrong_transaction", "transaction id"),
        ((reply[:10], tid), "short", "too short"),
        ((request, tid), "not_response", "not a Binding success response"),
        ((bytes(Message(Method.BINDING, Class.RESPONSE, tid)), tid), "no_address",
         "no XOR-MAPPED-ADDRESS"),
        ((bytes(Message(Method.BINDING, Class.RESPONSE, bytes(16), rfc3489=True)), tid),
         "bad_cookie", "no magic cookie"),
    ]
    for args, reason, text in refusals:
        with pytest.raises(StunParseError, match=text) as info:
            stun.parse_binding_response(*args)
        assert info.value.reason == reason


# -- RFC 3489 clients (RFC 5389 section 12.2) -----------------------------------------------


def classic_request(transaction_id: bytes, body: bytes = b"") -> bytes:
    """An RFC 3489 Binding request: type, length, then a 128-bit transaction id (no cookie)."""
    return struct.pack("!HH16s", 0x0001, len(body), transaction_id) + body


async def test_rfc3489_request_gets_mapped_address_and_its_transaction_id() -> None:
    async with stun_server() as server, udp_client() as client:
        assert client.transport is not None
        tid = bytes(range(100, 116))  # its first 4 bytes are not the cookie
        # with a CHANGE-REQUEST asking for no change, as RFC 3489 clients send it
        client.transport.sendto(classic_request(tid, struct.pack("!HHI", 0x0003, 4, 0)),
                                ("127.0.0.1", server.port))
        data = await asyncio.wait_for(client.raw.get(), WAIT)
        msg_type, length, got_tid = struct.unpack("!HH16s", data[:20])
        assert (msg_type, got_tid, len(data)) == (0x0101, tid, 20 + length)
        # MAPPED-ADDRESS first, in the clear (RFC 3489 section 11.2.1), no XOR, no FINGERPRINT.
        host, port = client.sockname
        attr_type, attr_len, _, family, got_port = struct.unpack("!HHBBH", data[20:28])
        assert (attr_type, attr_len, family, got_port) == (0x0001, 8, 1, port)
        assert socket.inet_ntoa(data[28:32]) == host
        reply = parse_message(data)
        assert reply.rfc3489 and reply.attributes["MAPPED-ADDRESS"] == (host, port)
        assert set(reply.attributes) == {"MAPPED-ADDRESS", "SOFTWARE"}
        # aioice (an RFC 5389 client) on the same server still gets XOR-MAPPED-ADDRESS.
        response = await client.binding(("127.0.0.1", server.port))
        assert response.attributes["XOR-MAPPED-ADDRESS"] == client.sockname
        # A 3489 client asking for another port gets the 420, in its own framing.
        client.transport.sendto(classic_request(tid, struct.pack("!HHI", 0x0003, 4, 0x02)),
                                ("127.0.0.1", server.port))
        error = parse_message(await asyncio.wait_for(client.raw.get(), WAIT))
        assert error.rfc3489 and error.transaction_id == tid
        assert error.attributes["ERROR-CODE"][0] == 420 and "FINGERPRINT" not in error.attributes
        # Malformed 3489 datagrams are dropped with a counted reason.
        client.transport.sendto(classic_request(tid)[:-1] + b"\x00\x01", ("127.0.0.1",
                                                                           server.port))
        assert await no_reply(client)
    assert server.answered_by_kind == {"rfc3489": 1, "rfc5389": 1}
    assert server.counters["answered"] == 2
    assert server.counters["error_420"] == 1 and server.counters["bad_length"] == 1


@pytest.mark.skipif(shutil.which("stun") is None,
                    reason="no RFC 3489 client: apt-get install stun-client (stund's `stun`)")
async def test_stund_rfc3489_client_reads_its_address() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # a free source port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with stun_server() as server:
        proc = await asyncio.create_subprocess_exec(
            "stun", f"127.0.0.1:{server.port}", "1", "-v", "-p", str(port),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
    text = out.decode(errors="replace")
    # test 1 of RFC 3489: one Binding request; the client parsed MAPPED-ADDRESS and matched
    # the transaction id ("ok=1").
    assert f"MappedAddress = 127.0.0.1:{port}" in text, text
    assert "ok=1" in text, text
    assert server.answered_by_kind["rfc3489"] >= 1 and server.answered_by_kind["rfc5389"] == 0
