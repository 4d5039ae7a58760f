"""The host and its connection manager on loopback, with a real rendezvous and real
transports: ZeroMQ towards a peer whose address was dialed back, WebRTC towards one without an
address, link kinds and set-up times reported to the rendezvous, back-off after a failed link,
typed member events, ``accept`` refusing models; and the connection manager alone, with fake
transports (one shared attempt, back-off doubling, link lost)."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from typing import Any

import numpy as np
import pytest

from overlay.connections import Connections, LinkState
from overlay.errors import TransportError, WireError
from overlay.events import Joined, LinkUp, MemberEvent
from overlay.host import Host, HostConfig
from overlay.identity import Identity
from overlay.membership import Member
from overlay.models import OutgoingModel, ReceivedModel
from overlay.protocol import LINK_KINDS
from overlay.rendezvous_client import ClientState
from overlay.transport.base import Frames, LinkKind, Reply, Transport, TransportStats
from overlay.wire import FrameType, NamedArray, decode_header, encode_control
from rendezvous.server import RendezvousServer, run_rendezvous
from testkit.fixtures import running_client, running_host, until

JOB = "hosttest"
pytestmark = pytest.mark.timeout(60)


def _model(host: Host[Any], epoch: int = 1, codec: str = "raw") -> OutgoingModel:
    rng = np.random.default_rng(epoch)
    arrays = [NamedArray("w", rng.standard_normal((256, 256), dtype=np.float32)),
              NamedArray("b", rng.standard_normal(256, dtype=np.float32))]
    return OutgoingModel(job=JOB, sender=host.peer_id, epoch=epoch, samples=10, arrays=arrays,
                         codec=codec)


async def _peers_json(server: RendezvousServer) -> dict[str, dict[str, Any]]:
    def get() -> dict[str, dict[str, Any]]:
        url = f"http://127.0.0.1:{server.port}/peers?job={JOB}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return {p["peer_id"]: p for p in json.load(response)["peers"]}

    return await asyncio.to_thread(get)


async def test_zmq_to_reachable_peers_webrtc_to_the_rest_reported_to_rendezvous() -> None:
    events: list[MemberEvent] = []
    async with run_rendezvous() as server, \
            running_host(server, job=JOB, on_member_event=events.append) as public, \
            running_host(server, job=JOB, listen=None) as natted:
        await until(lambda: natted.peer_id in public.members
                    and public.peer_id in natted.members, 10)
        member = natted.members[public.peer_id]
        assert isinstance(member, Member) and member.addrs and member.address is not None
        assert not public.members[natted.peer_id].addrs
        # the NATed peer reaches the public one over ZeroMQ ...
        await natted.send_model(public.peer_id, await natted.encode(_model(natted)))
        got = await asyncio.wait_for(public.inbox.get(), 10)
        assert isinstance(got, ReceivedModel)
        assert got.sender == natted.peer_id and got.epoch == 1 and got.job == JOB
        assert natted.links[public.peer_id].kind is LinkKind.ZMQ
        # ... and the public one reaches the NATed one over WebRTC
        encoded = await public.encode(_model(public, 2))
        await public.send_model(natted.peer_id, encoded)
        got = await asyncio.wait_for(natted.inbox.get(), 20)
        assert got.sender == public.peer_id and got.epoch == 2 and got.digest == encoded.digest
        np.testing.assert_array_equal(got.arrays[0].array, _model(public, 2).arrays[0].array)
        link = public.links[natted.peer_id]
        assert link.kind is LinkKind.WEBRTC_DIRECT and link.connect_s > 0
        # typed events: the NATed peer joined, then the link came up
        assert [type(e) for e in events] == [Joined, LinkUp]
        assert events[0].peer_id == natted.peer_id and events[1] == link
        # GET /peers shows both peers' links
        await until(lambda: bool(server.registry.get(public.peer_id).links)
                    and bool(server.registry.get(natted.peer_id).links), 10)
        peers = await _peers_json(server)
        assert peers[public.peer_id]["links"] == {
            natted.peer_id: {"kind": "webrtc-direct", "connect_s": link.connect_s}}
        assert peers[natted.peer_id]["links"][public.peer_id]["kind"] == "zmq"


async def test_newcomer_fetches_over_webrtc_from_a_natted_peer() -> None:
    async with run_rendezvous() as server, \
            running_host(server, job=JOB, listen=None) as donor, \
            running_host(server, job=JOB, listen=None) as newcomer:
        await until(lambda: donor.peer_id in newcomer.members, 10)
        with pytest.raises(TransportError, match="no model"):
            await newcomer.fetch_model(donor.peer_id)  # nothing published yet
        donor.publish(await donor.encode(_model(donor, 5)))
        got = await newcomer.fetch_model(donor.peer_id)
        assert got.epoch == 5 and got.sender == donor.peer_id
        assert newcomer.links[donor.peer_id].kind is LinkKind.WEBRTC_DIRECT


async def test_accept_makes_the_learners_object_or_refuses() -> None:
    def accept(model: ReceivedModel) -> tuple[str, int]:
        if model.epoch == 13:
            raise WireError("unlucky", "epoch 13")
        return model.sender, model.epoch

    async with run_rendezvous() as server, \
            running_host(server, job=JOB, accept=accept) as a, \
            running_host(server, job=JOB) as b:
        await until(lambda: b.peer_id in a.members and a.peer_id in b.members, 10)
        await b.send_model(a.peer_id, await b.encode(_model(b, 1)))
        assert await asyncio.wait_for(a.inbox.get(), 10) == (b.peer_id, 1)
        with pytest.raises(TransportError, match="unlucky"):
            await b.send_model(a.peer_id, await b.encode(_model(b, 13)))
        assert a.inbox.empty()
        assert a.rejected()["zmq"] == {"unlucky": 1}
        a.publish(await a.encode(_model(a, 13)))  # b's accept takes anything
        assert (await b.fetch_model(a.peer_id)).epoch == 13


async def test_failed_link_backs_off() -> None:
    async with run_rendezvous() as server, \
            running_host(server, job=JOB, listen=None, connect_timeout=1.0,
                         backoff_initial=30.0) as alone:
        # a member that never answers: a second host whose WebRTC side is gone
        async with running_host(server, job=JOB, listen=None) as gone:
            await until(lambda: gone.peer_id in alone.members, 10)
            assert gone.webrtc is not None
            await gone.webrtc.close()
            encoded = await alone.encode(_model(alone))
            with pytest.raises(TransportError):
                await alone.send_model(gone.peer_id, encoded)
            started = asyncio.get_running_loop().time()
            with pytest.raises(TransportError, match="retrying in"):
                await alone.send_model(gone.peer_id, encoded)
            assert asyncio.get_running_loop().time() - started < 0.5  # refused at once
            assert gone.peer_id not in alone.links


async def test_a_model_the_codec_cannot_carry_travels_raw() -> None:
    host = Host(Identity.generate(), HostConfig(rendezvous="127.0.0.1:1", job=JOB))
    big = OutgoingModel(job=JOB, sender=host.peer_id, epoch=1, samples=1, codec="fp16",
                        arrays=[NamedArray("w", np.array([1.0, 1e6], dtype=np.float32))])
    encoded = await host.encode(big)
    assert encoded.codec == "raw" and encoded.header["codec"] == "raw"
    ok = OutgoingModel(job=JOB, sender=host.peer_id, epoch=1, samples=1, codec="fp16",
                       arrays=[NamedArray("w", np.array([1.0, 2.0], dtype=np.float32))])
    encoded = await host.encode(ok)
    assert encoded.codec == "fp16" and len(encoded.digest) == 32
    assert encoded.nbytes == len(_packed(encoded.header)) + sum(
        p.nbytes for p in encoded.payloads)
    await host.close()
    await host.close()  # safe twice, even never started


def _packed(header: dict[str, Any]) -> bytes:
    from overlay.wire import pack_header

    frame = pack_header(header)
    assert decode_header(frame)["type"] == FrameType.MODEL.value
    return frame


async def test_host_is_an_async_context_manager_closed_twice() -> None:
    async with run_rendezvous() as server:
        host = Host(Identity.generate(), HostConfig(rendezvous=f"127.0.0.1:{server.port}",
                                                    job=JOB))
        async with host as started:
            assert started is host and host.state == "started"
        assert host.state == "closed"
        await host.close()


async def test_state_changes_are_logged_old_to_new(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="overlay")
    async with run_rendezvous() as server:
        async with running_client(server, job=JOB) as client:
            assert client.state is ClientState.CONNECTED
        assert client.state is ClientState.CLOSED
        async with running_host(server, job=JOB):
            pass
    changes = [r.getMessage().split(": ", 1)[1] for r in caplog.records
               if " -> " in r.getMessage()]
    assert changes[:3] == ["new -> connecting", "connecting -> connected",
                           "connected -> closed"]
    assert "new -> started" in changes and "started -> closed" in changes


def test_the_protocol_knows_every_link_kind() -> None:
    assert {kind.value for kind in LinkKind} == LINK_KINDS


def test_a_member_map_becomes_a_typed_member_or_nothing() -> None:
    ident = Identity.generate()
    wire = {"peer_id": ident.peer_id, "public_key": ident.public_key,
            "addrs": ["tcp://10.0.0.1:5555"], "meta": {"num": 3}, "joined_at": 12.5,
            "proof": b"p" * 32}
    member = Member.from_wire(wire)
    assert member == Member(ident.peer_id, ident.public_key, ("tcp://10.0.0.1:5555",),
                            member.meta if member else {}, 12.5, b"p" * 32)
    assert member is not None and member.meta["num"] == 3 and member.address == wire["addrs"][0]
    for bad in ({**wire, "peer_id": Identity.generate().peer_id}, {**wire, "addrs": "x"},
                {**wire, "public_key": "k"}, ["not", "a", "map"]):
        assert Member.from_wire(bad) is None


# ---- the connection manager alone -----------------------------------------------------------


class FakeDirectory:
    def __init__(self) -> None:
        self.addresses: dict[str, str | None] = {"reachable": "tcp://127.0.0.1:1",
                                                 "natted": None}

    def address_of(self, peer_id: str) -> str | None:
        return self.addresses.get(peer_id)

    def public_key_of(self, peer_id: str) -> bytes | None:
        return bytes(32) if peer_id in self.addresses else None

    def peer_of_curve_key(self, curve_public_key: bytes) -> str | None:
        return None


class FakeTransport(Transport):
    def __init__(self, name: str, kind: LinkKind) -> None:
        self.name = name  # type: ignore[misc]
        self.kind = kind
        self.stats = TransportStats()
        self.fail = False
        self.requests: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def close(self) -> None:
        pass

    async def request(self, peer_id: str, frames: Frames, request_id: str, *,
                      timeout: float) -> Reply:
        self.requests.append(decode_header(frames[0])["type"])
        await self.gate.wait()
        if self.fail:
            raise TransportError("down")
        return decode_header(encode_control(FrameType.PONG, request_id=request_id)), []

    async def forget(self, peer_id: str) -> None:
        pass

    def link_kind(self, peer_id: str) -> LinkKind | None:
        return self.kind


def _manager(**kw: float) -> tuple[Connections, FakeTransport, FakeTransport]:
    zmq = FakeTransport("zmq", LinkKind.ZMQ)
    webrtc = FakeTransport("webrtc", LinkKind.WEBRTC_RELAY)
    config = {"connect_timeout": 1.0, "backoff_initial": 1.0, "backoff_max": 3.0, **kw}
    return Connections(FakeDirectory(), zmq, webrtc, **config), zmq, webrtc


def _ping() -> tuple[list[bytes], str]:
    return [encode_control(FrameType.PING, request_id="r")], "r"


async def test_transport_per_peer_and_one_shared_attempt() -> None:
    manager, zmq, webrtc = _manager()
    webrtc.gate.clear()
    callers = [asyncio.create_task(manager.ensure("natted")) for _ in range(5)]
    await asyncio.sleep(0.05)
    webrtc.gate.set()
    ups = await asyncio.gather(*callers)
    assert webrtc.requests == ["ping"] and len(set(ups)) == 1
    assert ups[0].kind is LinkKind.WEBRTC_RELAY
    await manager.request("reachable", *_ping(), timeout=1.0)
    assert zmq.requests == ["ping", "ping"]  # the set-up ping, then ours
    assert set(manager.links) == {"natted", "reachable"}
    with pytest.raises(TransportError, match="not a member"):
        await manager.request("stranger", *_ping(), timeout=1.0)


async def test_back_off_doubles_to_the_maximum_and_a_lost_link_is_set_up_again() -> None:
    manager, zmq, _ = _manager(backoff_initial=0.05, backoff_max=0.12)
    zmq.fail = True
    delays = []
    for _ in range(4):
        with pytest.raises(TransportError, match="down"):
            await manager.ensure("reachable")
        link = manager._links["reachable"]
        assert link.state is LinkState.BACKOFF
        with pytest.raises(TransportError, match="retrying in"):
            await manager.ensure("reachable")
        delays.append(link.delay)
        await asyncio.sleep(link.not_before - asyncio.get_running_loop().time() + 0.01)
    assert delays == [0.05, 0.1, 0.12, 0.12]
    zmq.fail = False
    await manager.ensure("reachable")
    assert manager._links["reachable"].delay == 0.0
    zmq.fail = True
    with pytest.raises(TransportError):
        await manager.request("reachable", *_ping(), timeout=1.0)
    assert manager._links["reachable"].state is LinkState.IDLE and not manager.links
    await manager.forget("reachable")
    assert "reachable" not in manager._links
    await manager.close()
