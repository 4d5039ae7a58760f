"""Signed signaling (overlay/signaling.py): unit tests of seal / open, each refusal reason, the
bounded replay guard; then a malicious rendezvous that tries a real man-in-the-middle (its
own aiortc peer connection, its own DTLS certificate), unsigned, forged, misdirected and
replayed signals against two real hosts, and is caught each time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from overlay.errors import SignalError
from overlay.host import Host
from overlay.identity import DOMAIN_MODEL, DOMAIN_SIGNAL, Identity
from overlay.models import OutgoingModel
from overlay.protocol import MAX_SIGNAL_BYTES, MsgType, encode
from overlay.signaling import (
    NONCE_SIZE,
    SIGNAL_WINDOW,
    SignalGuard,
    SignalReject,
    seal,
    unpack_payload,
)
from overlay.transport.base import LinkKind
from overlay.wire import NamedArray
from rendezvous import RendezvousConfig, RendezvousServer
from testkit.fixtures import running_host, until

JOB = "signed"
NOW = 1_700_000_000.0
BODY = {"type": "offer", "sdp": "v=0\r\na=fingerprint:sha-256 AB:CD\r\n", "stage": "any"}

# -- seal / open --------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Pair:
    alice: Identity
    bob: Identity
    clock: Clock
    guard: SignalGuard  # bob's
    members: dict[str, bytes]

    def seal(self, **overrides: Any) -> bytes:
        args: dict[str, Any] = {"to": self.bob.peer_id, "job": JOB, "kind": "offer",
                                "body": BODY, "now": self.clock.now}
        args.update(overrides)
        return seal(self.alice, **args)


def _pair(**guard_args: Any) -> Pair:
    alice, bob = Identity.generate(), Identity.generate()
    members = {alice.peer_id: alice.public_key}
    clock = Clock()
    guard = SignalGuard(bob.peer_id, JOB, members.get, clock=clock, **guard_args)
    return Pair(alice, bob, clock, guard, members)


def _forge(signer: Identity, fields: dict[str, Any], domain: bytes = DOMAIN_SIGNAL) -> bytes:
    """An envelope with any fields, signed by ``signer`` (whatever ``from`` says)."""
    payload = msgpack.packb(fields, use_bin_type=True)
    return bytes(payload + signer.sign(domain + payload))


def _fields(p: Pair, **overrides: Any) -> dict[str, Any]:
    fields = {"v": 1, "from": p.alice.peer_id, "to": p.bob.peer_id, "job": JOB, "kind": "offer",
              "body": BODY, "ts": p.clock.now, "nonce": secrets.token_bytes(NONCE_SIZE)}
    fields.update(overrides)
    return fields


def _refused(p: Pair, data: Any, kind: str = "offer", relay_from: str | None = None) -> str:
    with pytest.raises(SignalError) as info:
        p.guard.open(relay_from or p.alice.peer_id, kind, data)
    return info.value.reason


def test_round_trip_gives_the_body_and_remembers_the_nonce() -> None:
    p = _pair()
    assert p.guard.open(p.alice.peer_id, "offer", p.seal()) == BODY
    assert p.guard.open(p.alice.peer_id, "hello", p.seal(kind="hello", body={})) == {}
    assert p.guard.remembered == 2
    payload = unpack_payload(p.seal())
    assert payload["from"] == p.alice.peer_id and payload["to"] == p.bob.peer_id
    assert len(payload["nonce"]) == NONCE_SIZE and payload["ts"] == NOW


def test_each_refusal_reason() -> None:
    p = _pair()
    rogue = Identity.generate()
    good = p.seal()
    cases: list[tuple[str, Callable[[], str]]] = [
        ("unsigned", lambda: _refused(p, dict(BODY))),
        ("malformed", lambda: _refused(p, b"\x00" * 10)),  # shorter than a signature
        ("malformed", lambda: _refused(p, b"\xc1" * 100)),  # not msgpack
        ("malformed", lambda: _refused(p, good[:-65] + good[-64:])),  # payload cut short
        ("malformed", lambda: _refused(p, b"\x00" * (MAX_SIGNAL_BYTES + 1))),
        ("malformed", lambda: _refused(p, _forge(p.alice, _fields(p, v=2)))),
        ("malformed", lambda: _refused(p, _forge(p.alice, _fields(p, ts=int(NOW))))),
        ("malformed", lambda: _refused(p, _forge(p.alice, _fields(p, nonce=b"x")))),
        ("malformed", lambda: _refused(p, _forge(p.alice, _fields(p, kind="gossip")))),
        ("malformed", lambda: _refused(p, _forge(p.alice, _fields(p, extra=1)))),
        ("malformed", lambda: _refused(p, _forge(p.alice, _fields(p, body={"a": {"b": 1}})))),
        ("malformed", lambda: _refused(p, _forge(p.alice, _fields(p, body=[1])))),
        ("malformed", lambda: _refused(p, _forge(p.alice, _fields(p, ts=float("nan"))))),
        ("sender_mismatch", lambda: _refused(p, good, relay_from=rogue.peer_id)),
        ("not_member", lambda: _refused(p, _forge(rogue, _fields(p, **{"from": rogue.peer_id})),
                                        relay_from=rogue.peer_id)),
        ("bad_signature", lambda: _refused(p, _forge(rogue, _fields(p)))),  # claims alice
        ("bad_signature", lambda: _refused(p, good[:-1] + bytes([good[-1] ^ 1]))),
        ("bad_signature", lambda: _refused(p, _forge(p.alice, _fields(p), DOMAIN_MODEL))),
        ("bad_signature", lambda: _refused(p, good.replace(b"stage\xa3any", b"stage\xa3own"))),
        ("wrong_recipient", lambda: _refused(p, p.seal(to=rogue.peer_id))),
        ("wrong_job", lambda: _refused(p, p.seal(job="other"))),
        ("kind_mismatch", lambda: _refused(p, good, kind="answer")),
        ("stale", lambda: _refused(p, p.seal(now=NOW - SIGNAL_WINDOW - 1))),
        ("stale", lambda: _refused(p, p.seal(now=NOW + SIGNAL_WINDOW + 1))),
    ]
    for want, attempt in cases:
        assert attempt() == want
    assert p.guard.remembered == 0  # nothing refused was remembered
    assert {w for w, _ in cases} | {"replayed"} == set(SignalReject)
    assert p.guard.open(p.alice.peer_id, "offer", good) == BODY  # the genuine one still opens
    assert _refused(p, good) == "replayed"


def test_a_peer_that_left_is_no_longer_believed() -> None:
    p = _pair()
    sealed = p.seal()
    del p.members[p.alice.peer_id]
    assert _refused(p, sealed) == "not_member"


def test_replay_guard_is_bounded_and_forgetting_lets_no_replay_through() -> None:
    p = _pair(max_remembered=3)
    sealed = [p.seal(now=NOW - 10 + i) for i in range(5)]
    for data in sealed:
        p.guard.open(p.alice.peer_id, "offer", data)
        assert p.guard.remembered <= 3
    # the two oldest were forgotten: they are now refused as too old, never let through again
    assert [_refused(p, d) for d in sealed] == ["stale", "stale", "replayed", "replayed",
                                                "replayed"]
    # so is a fresh signal sealed as early as a forgotten one
    assert _refused(p, p.seal(now=NOW - 9)) == "stale"
    # nonces leave once the window has passed (their signals are stale anyway)
    p.clock.now += SIGNAL_WINDOW + 11
    fresh = p.seal()
    assert p.guard.open(p.alice.peer_id, "offer", fresh) == BODY
    assert p.guard.remembered == 1
    assert [_refused(p, d) for d in sealed] == ["stale"] * 5


def test_a_member_flooding_the_replay_guard_only_locks_out_itself() -> None:
    p = _pair(max_remembered=8)
    carol = Identity.generate()
    p.members[carol.peer_id] = carol.public_key
    # alice fills her share with signals dated at the far end of the window, and more
    outcomes = []
    for _ in range(20):
        try:
            p.guard.open(p.alice.peer_id, "offer", p.seal(now=NOW + SIGNAL_WINDOW - 1))
            outcomes.append("opened")
        except SignalError as exc:
            outcomes.append(exc.reason)
    assert outcomes[:8] == ["opened"] * 8 and "stale" in outcomes[8:]
    assert _refused(p, p.seal()) == "stale"  # alice's own honest-looking one: locked out
    fresh = seal(carol, to=p.bob.peer_id, job=JOB, kind="offer", body=BODY, now=NOW)
    assert p.guard.open(carol.peer_id, "offer", fresh) == BODY  # carol is not
    assert p.guard.remembered <= 8 + 1


def test_replay_guard_survives_our_clock_jumping_back() -> None:
    p = _pair()
    old = p.seal()
    p.guard.open(p.alice.peer_id, "offer", old)
    p.clock.now += SIGNAL_WINDOW + 1
    p.guard.open(p.alice.peer_id, "offer", p.seal())  # forgets ``old``
    p.clock.now = NOW  # the clock is set back: ``old`` looks fresh again
    assert _refused(p, old) == "stale"


def test_seal_refuses_what_cannot_travel() -> None:
    me = Identity.generate()
    with pytest.raises(ValueError):
        seal(me, "x", JOB, "gossip", {})
    with pytest.raises(ValueError):
        seal(me, "x", JOB, "offer", {"nested": {"a": 1}})
    with pytest.raises(ValueError):
        seal(me, "x", JOB, "offer", {"sdp": "a" * MAX_SIGNAL_BYTES})


# -- a malicious rendezvous -----------------------------------------------------------------


@dataclass
class Relayed:
    sender: str
    to: str
    kind: str
    data: Any


class MaliciousRendezvous(RendezvousServer):
    """Relays nothing while ``honest`` is False: every signal goes to ``captured`` and the test
    plays the rendezvous with :meth:`inject` (any ``from``, any data)."""

    def __init__(self, config: RendezvousConfig) -> None:
        super().__init__(config)
        self.honest = False
        self.captured: asyncio.Queue[Relayed] = asyncio.Queue()

    def _relay_signal(self, conn: Any, size: int, fields: dict[str, Any], now: float) -> None:
        if self.honest:
            super()._relay_signal(conn, size, fields, now)
        else:
            self.captured.put_nowait(Relayed(conn.peer_id, fields["to"], fields["kind"],
                                             fields["data"]))

    def inject(self, to: str, sender: str, kind: str, data: Any) -> None:
        self._sessions[to].send(encode(MsgType.SIGNAL, **{"from": sender, "kind": kind,
                                                          "data": data}))

    async def next_captured(self, kind: str, sender: str, timeout: float = 10.0) -> Relayed:
        async with asyncio.timeout(timeout):
            while True:
                relayed = await self.captured.get()
                if relayed.kind == kind and relayed.sender == sender:
                    return relayed


class Mitm:
    """The rendezvous' own WebRTC endpoints: its own DTLS certificate in every SDP it makes."""

    def __init__(self) -> None:
        self.pcs: list[RTCPeerConnection] = []
        self.opened: list[str] = []

    def _pc(self, name: str) -> RTCPeerConnection:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # host candidates only
        channel = pc.createDataChannel("peerlearn", negotiated=True, id=0, ordered=True)
        channel.on("open", lambda: self.opened.append(name))
        self.pcs.append(pc)
        return pc

    async def offer(self) -> tuple[RTCPeerConnection, str]:
        pc = self._pc("as offerer")
        await pc.setLocalDescription(await pc.createOffer())
        return pc, pc.localDescription.sdp

    async def answer(self, offer_sdp: str) -> str:
        pc = self._pc("as answerer")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return str(pc.localDescription.sdp)

    async def close(self) -> None:
        await asyncio.gather(*(pc.close() for pc in self.pcs))


def _fingerprint(sdp: str) -> str:
    return next(line for line in sdp.splitlines() if line.startswith("a=fingerprint:"))


def _retouch(sealed: bytes, **changes: Any) -> bytes:
    """The same envelope (same nonce, timestamp, signature) with payload fields changed."""
    payload = unpack_payload(sealed)
    payload.update(changes)
    return bytes(msgpack.packb(payload, use_bin_type=True) + sealed[-64:])


@contextlib.asynccontextmanager
async def _malicious() -> AsyncIterator[MaliciousRendezvous]:
    server = MaliciousRendezvous(RendezvousConfig(host="127.0.0.1", port=0, stun_port=None))
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def _rejected(host: Host[Any]) -> dict[str, int]:
    assert host.webrtc is not None
    return dict(host.webrtc.stats.rejected)


def _model(host: Host[Any]) -> OutgoingModel:
    arrays = [NamedArray("w", np.arange(1000, dtype=np.float32))]
    return OutgoingModel(job=JOB, sender=host.peer_id, epoch=1, samples=10, arrays=arrays)


# -- aiortc enforces the fingerprint that the signed SDP carries ------------------------------


async def test_aiortc_refuses_a_dtls_certificate_that_is_not_the_one_in_the_sdp() -> None:
    """RTCDtlsTransport._validate_peer_identity: after the handshake, the remote certificate
    must match the ``a=fingerprint`` of the remote description, else the transport fails."""
    mitm = Mitm()
    offerer, offer = await mitm.offer()
    _, other_offer = await mitm.offer()  # a third certificate, as an attacker would have
    answer = await mitm.answer(offer)
    failed = asyncio.Event()
    offerer.on("connectionstatechange",
               lambda: failed.set() if offerer.connectionState == "failed" else None)
    swapped = answer.replace(_fingerprint(answer), _fingerprint(other_offer))
    assert swapped != answer
    await offerer.setRemoteDescription(RTCSessionDescription(sdp=swapped, type="answer"))
    await asyncio.wait_for(failed.wait(), 20)
    assert mitm.opened == []
    await mitm.close()


@pytest.mark.timeout(90)
async def test_a_malicious_rendezvous_is_caught(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="overlay.host")
    lo_id, hi_id = sorted((Identity.generate(), Identity.generate()), key=lambda i: i.peer_id)
    rogue = Identity.generate()  # the rendezvous' own key: it is no member of the job
    mitm = Mitm()
    started = time.monotonic()
    async with (
        _malicious() as server,
        running_host(server, identity=lo_id, job=JOB, listen=None,
                     connect_timeout=15.0) as lo,  # lo offers (smaller id), hi answers
        running_host(server, identity=hi_id, job=JOB, listen=None,
                     connect_timeout=15.0) as hi,
        running_host(server, job=JOB, listen=None, connect_timeout=15.0) as third,
    ):
        ids = {h.peer_id for h in (lo, hi, third)}
        await until(lambda: all(set(h.members) == ids - {h.peer_id} for h in (lo, hi, third)),
                    timeout=10.0)
        assert lo.webrtc is not None and hi.webrtc is not None and third.webrtc is not None
        hi_rtc = hi.webrtc
        assert lo.rendezvous is not None and lo.rendezvous.ice_servers == []
        attempt = asyncio.create_task(lo.webrtc.connect(hi.peer_id))
        genuine = await server.next_captured("offer", lo.peer_id)
        assert isinstance(genuine.data, bytes) and genuine.to == hi.peer_id
        offer_body = unpack_payload(genuine.data)["body"]

        # (a) man in the middle: its own SDP (its own DTLS fingerprint) in lo's envelope to hi,
        # and an answer to lo from "hi" that it made itself and signed with its own key.
        mitm_offerer, mitm_offer = await mitm.offer()
        assert _fingerprint(mitm_offer) != _fingerprint(offer_body["sdp"])
        server.inject(hi.peer_id, lo.peer_id, "offer",
                      _retouch(genuine.data, body={**offer_body, "sdp": mitm_offer}))
        mitm_answer = await mitm.answer(offer_body["sdp"])
        server.inject(lo.peer_id, hi.peer_id, "answer", _forge(
            rogue, {"v": 1, "from": hi.peer_id, "to": lo.peer_id, "job": JOB, "kind": "answer",
                      "body": {"type": "answer", "sdp": mitm_answer, "stage": "any"},
                      "ts": time.time(), "nonce": secrets.token_bytes(NONCE_SIZE)}))
        await until(lambda: _rejected(hi).get("signal_bad_signature") == 1
                    and _rejected(lo).get("signal_bad_signature") == 1, timeout=10.0)
        # had hi answered the MITM's offer, the MITM would now complete its side with it
        while not server.captured.empty():
            relayed = server.captured.get_nowait()
            if relayed.kind == "answer" and relayed.sender == hi.peer_id:
                body = unpack_payload(relayed.data)["body"]
                await mitm_offerer.setRemoteDescription(
                    RTCSessionDescription(sdp=body["sdp"], type="answer"))

        # (b) an unsigned, old-style signal
        server.inject(hi.peer_id, lo.peer_id, "offer",
                      {"type": "offer", "sdp": mitm_offer, "stage": "any"})
        # (c) forgeries: lo's genuine offer passed off as the third member's, or delivered to
        # the third member, or relayed as another kind; a signal "from" the third member
        # signed by the rendezvous; one from a peer id that is no member
        server.inject(hi.peer_id, third.peer_id, "offer", genuine.data)
        server.inject(third.peer_id, lo.peer_id, "offer", genuine.data)
        server.inject(hi.peer_id, lo.peer_id, "answer", genuine.data)
        server.inject(hi.peer_id, third.peer_id, "hello", _forge(
            rogue, {"v": 1, "from": third.peer_id, "to": hi.peer_id, "job": JOB,
                      "kind": "hello", "body": {}, "ts": time.time(),
                      "nonce": secrets.token_bytes(NONCE_SIZE)}))
        server.inject(hi.peer_id, rogue.peer_id, "offer", seal(rogue, hi.peer_id, JOB, "offer",
                                                               offer_body))
        await until(lambda: sum(_rejected(hi).values()) == 6
                    and sum(_rejected(third).values()) == 1, timeout=10.0)
        assert _rejected(hi) == {"signal_bad_signature": 2, "signal_unsigned": 1,
                                 "signal_sender_mismatch": 1, "signal_kind_mismatch": 1,
                                 "signal_not_member": 1}
        assert _rejected(third) == {"signal_wrong_recipient": 1}
        assert _rejected(lo) == {"signal_bad_signature": 1}
        assert mitm.opened == [], "the man in the middle got a data channel open"
        await mitm.close()  # before lo's ICE starts: its packets must not reach lo's socket

        # (d) the genuine offer, passed on, is accepted and answered ...
        server.inject(hi.peer_id, lo.peer_id, "offer", genuine.data)
        answer = await server.next_captured("answer", hi.peer_id)
        server.inject(lo.peer_id, hi.peer_id, "answer", answer.data)
        link = await asyncio.wait_for(attempt, 20)
        assert link.is_open
        await until(lambda: (hi_rtc.link_info(lo.peer_id) or {}).get("state") == "open",
                    timeout=10.0)
        # ... but replayed (which would otherwise tear the open link down) it is refused
        server.inject(hi.peer_id, lo.peer_id, "offer", genuine.data)
        server.inject(lo.peer_id, hi.peer_id, "answer", answer.data)
        await until(lambda: _rejected(hi).get("signal_replayed") == 1
                    and _rejected(lo).get("signal_replayed") == 1, timeout=10.0)
        assert (hi.webrtc.link_info(lo.peer_id) or {}).get("state") == "open"
        assert link.is_open

        refusals = [r.getMessage() for r in caplog.records if "refused a" in r.getMessage()]
        for reason in ("bad_signature", "unsigned", "sender_mismatch", "wrong_recipient",
                       "kind_mismatch", "not_member", "replayed"):
            assert any(f": {reason}: " in line for line in refusals), reason
        assert mitm.opened == []

        # an honest relay: the same hosts make a fresh link and exchange a model
        before = [_rejected(h) for h in (lo, hi, third)]
        await lo.webrtc.forget(hi.peer_id)
        await hi.webrtc.forget(lo.peer_id)
        server.honest = True
        await lo.send_model(hi.peer_id, await lo.encode(_model(lo)))
        got = await asyncio.wait_for(hi.inbox.get(), 10)
        assert got.sender == lo.peer_id
        assert lo.links[hi.peer_id].kind is LinkKind.WEBRTC_DIRECT
        assert [_rejected(h) for h in (lo, hi, third)] == before
    logging.getLogger(__name__).info("malicious rendezvous test: %.1f s",
                                     time.monotonic() - started)
