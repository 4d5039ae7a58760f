"""The connection manager on loopback, with a real rendezvous and real transports: ZeroMQ
towards a peer whose address was dialed back, WebRTC towards one without an address, link
kinds and set-up times reported to the rendezvous, back-off after a failed link."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest

from overlay.errors import TransportError
from overlay.host import Host, HostConfig
from overlay.identity import Identity
from overlay.wire import ModelMessage, NamedArray, decode_header
from rendezvous.server import RendezvousServer, run_rendezvous

JOB = "hosttest"


@asynccontextmanager
async def _host(server: RendezvousServer, listen: str | None, **config: object
                ) -> AsyncIterator[Host]:
    host = Host(Identity.generate(),
                HostConfig(rendezvous=f"127.0.0.1:{server.port}", job=JOB, listen=listen,
                           **config))  # type: ignore[arg-type]
    await host.start()
    try:
        yield host
    finally:
        await host.close()


async def _until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


def _model(host: Host, epoch: int = 1) -> ModelMessage:
    rng = np.random.default_rng(epoch)
    arrays = [NamedArray("w", rng.standard_normal((256, 256), dtype=np.float32)),
              NamedArray("b", rng.standard_normal(256, dtype=np.float32))]
    return ModelMessage(job=JOB, sender=host.peer_id, epoch=epoch, samples=10, arrays=arrays)


async def _peers_json(server: RendezvousServer) -> dict[str, dict[str, object]]:
    def get() -> dict[str, dict[str, object]]:
        url = f"http://127.0.0.1:{server.port}/peers?job={JOB}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return {p["peer_id"]: p for p in json.load(response)["peers"]}

    return await asyncio.to_thread(get)


async def test_zmq_to_reachable_peers_webrtc_to_the_rest_reported_to_rendezvous() -> None:
    async with run_rendezvous() as server, \
            _host(server, "tcp://127.0.0.1:0") as public, _host(server, None) as natted:
        await _until(lambda: natted.peer_id in public.members
                     and public.peer_id in natted.members)
        # the NATed peer reaches the public one over ZeroMQ ...
        frames, rid = natted.encode(_model(natted))
        await natted.send_model(public.peer_id, frames, rid)
        got = await asyncio.wait_for(public.inbox.get(), 10)
        assert got.sender == natted.peer_id and got.epoch == 1
        assert natted.links[public.peer_id]["kind"] == "zmq"
        # ... and the public one reaches the NATed one over WebRTC
        frames, rid = public.encode(_model(public, 2))
        await public.send_model(natted.peer_id, frames, rid)
        got = await asyncio.wait_for(natted.inbox.get(), 20)
        assert got.sender == public.peer_id and got.epoch == 2
        np.testing.assert_array_equal(got.arrays[0].array, _model(public, 2).arrays[0].array)
        link = public.links[natted.peer_id]
        assert link["kind"] == "webrtc-direct" and link["connect_s"] > 0
        # GET /peers shows both peers' links
        await _until(lambda: bool(server.registry.get(public.peer_id).links)
                     and bool(server.registry.get(natted.peer_id).links))
        peers = await _peers_json(server)
        assert peers[public.peer_id]["links"] == {natted.peer_id: link}
        assert peers[natted.peer_id]["links"][public.peer_id]["kind"] == "zmq"


async def test_newcomer_fetches_over_webrtc_from_a_natted_peer() -> None:
    async with run_rendezvous() as server, \
            _host(server, None) as donor, _host(server, None) as newcomer:
        await _until(lambda: donor.peer_id in newcomer.members)
        with pytest.raises(TransportError, match="no model"):
            await newcomer.fetch_model(donor.peer_id)  # nothing published yet
        donor.publish(_model(donor, 5))
        got = await newcomer.fetch_model(donor.peer_id)
        assert got.epoch == 5 and got.sender == donor.peer_id
        assert newcomer.links[donor.peer_id]["kind"] == "webrtc-direct"


async def test_failed_link_backs_off() -> None:
    async with run_rendezvous() as server, \
            _host(server, None, connect_timeout=1.0, backoff_initial=30.0) as alone:
        # a member that never answers: a second host whose WebRTC side is gone
        async with _host(server, None) as gone:
            await _until(lambda: gone.peer_id in alone.members)
            assert gone.webrtc is not None
            await gone.webrtc.close()
            frames, rid = alone.encode(_model(alone))
            with pytest.raises(TransportError):
                await alone.send_model(gone.peer_id, frames, rid)
            started = asyncio.get_running_loop().time()
            with pytest.raises(TransportError, match="retrying in"):
                await alone.send_model(gone.peer_id, frames, rid)
            assert asyncio.get_running_loop().time() - started < 0.5  # refused at once
            assert gone.peer_id not in alone.links


def test_a_model_the_codec_cannot_carry_travels_raw() -> None:
    host = Host(Identity.generate(), HostConfig(rendezvous="127.0.0.1:1", job=JOB))
    msg = ModelMessage(job=JOB, sender=host.peer_id, epoch=1, samples=1, codec="fp16",
                       arrays=[NamedArray("w", np.array([1.0, 1e6], dtype=np.float32))])
    frames, _ = host.encode(msg)
    assert msg.codec == "raw"
    assert decode_header(frames[0])["codec"] == "raw"
    ok = ModelMessage(job=JOB, sender=host.peer_id, epoch=1, samples=1, codec="fp16",
                      arrays=[NamedArray("w", np.array([1.0, 2.0], dtype=np.float32))])
    frames, _ = host.encode(ok)
    assert decode_header(frames[0])["codec"] == "fp16"
