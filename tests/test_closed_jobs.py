"""Closed jobs (join secret, allowed peer ids) at the rendezvous and at every peer; what the
HTTP endpoints show; per-session and per-IP rate limits; dial-back only to the peer's own IP.

A real rendezvous on port 0 with real clients and hosts; one real-process CLI test."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from overlay.errors import RendezvousError, RendezvousRefused, TransportError
from overlay.identity import Identity
from overlay.membership import (
    JobPolicy,
    Refusal,
    job_proof,
    parse_peer_ids,
    policy_from_files,
    read_peer_list,
)
from overlay.models import OutgoingModel
from overlay.protocol import ErrorCode, MsgType, decode, encode, signed_join
from overlay.rendezvous_client import RendezvousClient
from overlay.wire import NamedArray
from peerlearn.cli import build_parser
from rendezvous import RendezvousConfig, RendezvousServer
from rendezvous.options import config_from_args
from rendezvous.ratelimit import KeyedRateLimiter, TokenBucket
from testkit.fixtures import running_client, running_host, running_rendezvous, until
from testkit.swarm import LocalSwarm

JOB = "closed"
SECRET = b"correct horse battery staple"
WAIT = 5.0


async def refusal(server: RendezvousServer, identity: Identity | None = None, job: str = JOB,
                  **kw: Any) -> RendezvousError:
    with pytest.raises(RendezvousError) as info:
        async with running_client(server, identity, job, **kw):
            pass
    return info.value


async def http(server: RendezvousServer, path: str) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{server.port}{path}") as resp:
            assert resp.status == 200
            return await resp.text()


# -- the policy itself --------------------------------------------------------------------------


def test_policy_checks_proof_and_list(tmp_path: Path) -> None:
    a, b = Identity.generate(), Identity.generate()
    policy = JobPolicy(secret=SECRET, allowed_peers=frozenset([a.peer_id]))
    proof = policy.proof(JOB, a.public_key)
    assert proof == job_proof(SECRET, JOB, a.public_key) and len(proof) == 32
    assert policy.check(JOB, a.public_key, proof) is None
    assert policy.check(JOB, a.public_key, None) is Refusal.NO_PROOF
    assert policy.check(JOB, a.public_key, job_proof(b"another secret, long", JOB,
                                                      a.public_key)) is Refusal.BAD_PROOF
    assert policy.check("other-job", a.public_key, proof) is Refusal.BAD_PROOF  # bound to job
    # bound to the key: a's proof is worth nothing to b (who is not listed either)
    assert JobPolicy(secret=SECRET).check(JOB, b.public_key, proof) is Refusal.BAD_PROOF
    assert policy.check(JOB, b.public_key, policy.proof(JOB, b.public_key)) is Refusal.NOT_LISTED
    assert SECRET.decode() not in repr(policy)
    assert SECRET.decode() not in repr(RendezvousConfig(jobs={JOB: policy}))
    with pytest.raises(ValueError, match="at least 16"):
        JobPolicy(secret=b"short")

    listing = tmp_path / "allowed.txt"
    listing.write_text(f"# the team\n{a.peer_id.upper()}  # alice\n\n{b.peer_id}\n")
    assert read_peer_list(listing) == {a.peer_id, b.peer_id}
    with pytest.raises(ValueError, match=r"allowed.txt:2: 'nope' is not a peer id"):
        parse_peer_ids(["# ok", "nope"], "allowed.txt")
    (tmp_path / "empty.txt").write_text("# nobody\n")
    with pytest.raises(ValueError, match="no peer ids"):
        read_peer_list(tmp_path / "empty.txt")
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    loaded = policy_from_files(str(secret_file), None, str(listing))
    assert loaded is not None and loaded.secret == SECRET
    with pytest.raises(ValueError, match="cannot read the join secret"):
        policy_from_files(str(tmp_path / "missing"))
    assert policy_from_files() is None


def test_rendezvous_options_read_secrets_from_files_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = tmp_path / "ids"
    ids.write_text(Identity.generate().peer_id + "\n")
    secret = tmp_path / "s"
    secret.write_bytes(SECRET)
    monkeypatch.setenv("TEAM_SECRET", "another secret, from the environment")
    args = build_parser().parse_args([
        "rendezvous", "--closed", "--expose-addresses", "--job-secret", f"a={secret}",
        "--allow-peers", f"a={ids}", "--job-secret-env", "b=TEAM_SECRET",
    ])
    config = config_from_args(args)
    assert config.closed and config.expose_addresses and not config.dialback_any_host
    assert config.jobs["a"].secret == SECRET and config.jobs["a"].allowed_peers
    assert config.jobs["b"].secret == b"another secret, from the environment"
    assert b"environment" not in repr(config).encode() and SECRET not in repr(config).encode()
    for bad in (["--job-secret", "a"], ["--job-secret", f"a={tmp_path / 'none'}"],
                ["--job-secret-env", "a=UNSET_VARIABLE_H1"],
                ["--job-secret", f"a={secret}", "--job-secret-env", "a=TEAM_SECRET"]):
        with pytest.raises(ValueError):
            config_from_args(build_parser().parse_args(["rendezvous", *bad]))


def test_token_buckets() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5) and not bucket.take(0.5)  # one token back after 0.5 s
    limiter = KeyedRateLimiter(rate=1.0, burst=2.0, max_keys=2)
    assert limiter.allow("a", 0.0) and limiter.allow("a", 0.0) and not limiter.allow("a", 0.0)
    assert limiter.exhausted("a", 0.0) and not limiter.exhausted("b", 0.0)
    assert not limiter.exhausted("a", 1.0)  # refilled


# -- admission at the rendezvous ----------------------------------------------------------------


async def test_invited_peers_join_everybody_else_is_refused_with_a_reason() -> None:
    alice, bob, carol = Identity.generate(), Identity.generate(), Identity.generate()
    policy = JobPolicy(secret=SECRET, allowed_peers=frozenset([alice.peer_id, bob.peer_id]))
    wrong = JobPolicy(secret=b"not the job's secret at all")
    async with running_rendezvous(fast=True, jobs={JOB: policy}) as server:
        async with running_client(server, alice, JOB, membership=policy) as a:
            async with running_client(server, bob, JOB, membership=policy) as b:
                assert set(b.members) == {alice.peer_id}
                await until(lambda: bob.peer_id in a.members)
                assert a.members[bob.peer_id].proof == policy.proof(JOB, bob.public_key)
            exc = await refusal(server, bob)
            assert isinstance(exc, RendezvousRefused) and exc.code == ErrorCode.NOT_INVITED
            assert str(exc) == f"not_invited: job {JOB} needs a join secret"
            exc = await refusal(server, bob, membership=wrong)
            assert str(exc) == f"not_invited: wrong join secret for job {JOB}"
            exc = await refusal(server, carol, membership=policy)  # right secret, not listed
            assert str(exc) == f"not_invited: peer {carol.peer_id} is not on job {JOB}'s list"
            assert [m.peer_id for m in server.registry.members(JOB)] == [alice.peer_id]
            # other jobs stay open on an open rendezvous
            async with running_client(server, carol, job="public") as c:
                assert c.members == {}
    async with running_rendezvous(fast=True, closed=True, jobs={JOB: policy}) as server:
        exc = await refusal(server, job="public")
        assert str(exc) == "not_invited: job public is not served by this rendezvous"


async def test_invited_peer_rejoins_a_restarted_rendezvous_a_dropped_one_gives_up() -> None:
    alice = Identity.generate()
    policy = JobPolicy(secret=SECRET)
    async with running_rendezvous(fast=True, jobs={JOB: policy}) as first:
        port = first.port
        c = RendezvousClient(first.url, alice, JOB, [], {}, backoff_initial=0.1,
                             membership=policy)
        await c.start()
    try:
        async with running_rendezvous(fast=True, jobs={JOB: policy}, port=port) as second:
            await until(lambda: c.connected and second.registry.get(alice.peer_id) is not None)
        # the next one no longer invites alice: she stops trying instead of looping
        other = JobPolicy(secret=b"the new secret of the closed job")
        async with running_rendezvous(fast=True, jobs={JOB: other}, port=port) as third:
            await until(lambda: c.refused is not None)
            assert "wrong join secret" in str(c.refused) and not c.connected
            assert third.registry.get(alice.peer_id) is None
            assert c._tasks[0].done()  # the session task ended: no reconnect loop
    finally:
        await c.close()


async def test_refused_joins_are_bounded_per_ip() -> None:
    policy = JobPolicy(secret=SECRET)
    async with running_rendezvous(fast=True, jobs={JOB: policy}, failed_join_burst=2,
                                  failed_join_rate=0.01) as server:
        for _ in range(2):
            assert "needs a join secret" in str(await refusal(server))
        exc = await refusal(server, membership=policy)  # even a good join, now
        assert "rate_limited: too many refused joins from 127.0.0.1" in str(exc)


# -- peers check membership themselves ------------------------------------------------------------


async def test_peers_ignore_members_an_open_rendezvous_lets_in(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = JobPolicy(secret=SECRET)
    caplog.set_level(logging.WARNING, logger="overlay.rendezvous_client")
    # an open (or misconfigured, or lying) rendezvous: it admits anybody
    async with running_rendezvous(fast=True) as server, \
            running_host(server, job=JOB, membership=policy, send_timeout=5.0,
                         connect_timeout=5.0) as a, \
            running_host(server, job=JOB, membership=policy, send_timeout=5.0,
                         connect_timeout=5.0) as b, \
            running_host(server, job=JOB, send_timeout=5.0, connect_timeout=5.0) as mallory, \
            running_client(server, job=JOB,
                           membership=JobPolicy(secret=b"a guessed secret, wrong")) as guesser:
        await until(lambda: b.peer_id in a.members and a.peer_id in b.members)
        await until(lambda: len(server.registry.members(JOB)) == 4)
        await asyncio.sleep(0.3)  # the joined events of mallory and the guesser reached a
        assert set(a.members) == {b.peer_id}
        assert a.rendezvous is not None
        assert a.rendezvous.refused_members == {"bad_proof": 1, "no_proof": 1}
        # models from a peer outside the view are refused: its key is unknown to a
        await until(lambda: a.peer_id in mallory.members)  # mallory's own view is wrong
        arrays = [NamedArray("w", np.ones((4, 4), dtype=np.float32))]
        msg = OutgoingModel(job=JOB, sender=mallory.peer_id, epoch=1, samples=1, arrays=arrays)
        with pytest.raises(TransportError):
            await mallory.send_model(a.peer_id, await mallory.encode(msg))
        assert a.inbox.empty()
        # the invited peers do talk
        encoded = await b.encode(OutgoingModel(job=JOB, sender=b.peer_id, epoch=1, samples=1,
                                               arrays=arrays))
        await b.send_model(a.peer_id, encoded)
        assert (await asyncio.wait_for(a.inbox.get(), WAIT)).sender == b.peer_id
    refusals = [r.getMessage() for r in caplog.records if "ignoring member" in r.getMessage()]
    assert any(f"{guesser.peer_id} that the rendezvous announced: wrong join secret" in m
               for m in refusals)
    assert any(f"{mallory.peer_id} that the rendezvous announced: job {JOB} needs a join "
               "secret" in m for m in refusals)


# -- HTTP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("expose", [False, True])
async def test_http_shows_no_addresses_unless_asked_and_never_proofs(expose: bool) -> None:
    policy = JobPolicy(secret=SECRET)
    async with running_rendezvous(fast=True, jobs={JOB: policy},
                                  expose_addresses=expose) as server, \
            running_host(server, job=JOB, membership=policy, send_timeout=5.0,
                         connect_timeout=5.0) as h:
        assert h.rendezvous is not None
        (address,) = h.rendezvous.reachable_addrs
        port = address.rsplit(":", 1)[1]
        body = json.loads(await http(server, f"/peers?job={JOB}"))
        (peer,) = body["peers"]
        assert peer["reachable"] is True
        assert ("addrs" in peer) is expose and peer.get("addrs", [address]) == [address]
        dashboard = await http(server, "/")
        healthz = await http(server, "/healthz")
        proof = policy.proof(JOB, h.identity.public_key)
        assert proof is not None
        for text in (json.dumps(body), dashboard, healthz):
            assert SECRET.decode() not in text and proof.hex() not in text
            assert "proof" not in text
        assert (port in dashboard) is expose and (port in json.dumps(body)) is expose


# -- per-session rate limit ---------------------------------------------------------------------


async def test_a_flooding_session_is_told_then_closed() -> None:
    me = Identity.generate()
    async with running_rendezvous(fast=True, message_rate=2.0, message_burst=10.0,
                                  max_errors=3) as server, aiohttp.ClientSession() as session:
        async with session.ws_connect(server.url) as ws:
            challenge = decode((await ws.receive(timeout=WAIT)).data)[1]
            await ws.send_bytes(signed_join(me, challenge["nonce"], JOB))
            assert decode((await ws.receive(timeout=WAIT)).data)[0] is MsgType.WELCOME
            for _ in range(30):
                await ws.send_bytes(encode(MsgType.HEARTBEAT))
            errors = []
            while (msg := await ws.receive(timeout=WAIT)).type is aiohttp.WSMsgType.BINARY:
                msg_type, fields = decode(msg.data)
                assert msg_type is MsgType.ERROR
                errors.append((fields["code"], fields["message"]))
            assert errors == [("rate_limited", "more than 2 messages per second")] * 3
            assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
        # a session at a normal pace is not affected
        async with running_client(server, me, JOB) as c:
            for _ in range(5):
                await c.report(1, {"acc": 0.5})
            await asyncio.sleep(0.2)
            assert c.connected


# -- dial-back only to the IP the peer connects from --------------------------------------------


async def test_dialback_only_to_the_peers_own_ip(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rendezvous")
    # a "third party" on 127.0.0.2 while the peer connects from 127.0.0.1
    for any_host in (False, True):
        async with running_rendezvous(fast=True, dialback_any_host=any_host) as server, \
                running_host(server, job=JOB, listen="tcp://127.0.0.2:0", send_timeout=5.0,
                             connect_timeout=5.0) as h:
            assert h.rendezvous is not None
            assert bool(h.rendezvous.reachable_addrs) is any_host
    assert "where the peer connects from" in caplog.text


async def test_dialback_targets() -> None:
    server = RendezvousServer(RendezvousConfig(dialback_timeout=2.0))
    target = server._dialback_target
    assert await target("tcp://127.0.0.1:5000", "127.0.0.1") == "tcp://127.0.0.1:5000"
    assert await target("tcp://127.0.0.1:5000", "::ffff:127.0.0.1") == "tcp://127.0.0.1:5000"
    assert await target("tcp://[::1]:5000", "::1") == "tcp://[::1]:5000"
    assert await target("tcp://[::1]:5000", "127.0.0.1") is None
    assert await target("tcp://10.1.2.3:5000", "127.0.0.1") is None
    assert await target("tcp://localhost:5000", "127.0.0.1") == "tcp://127.0.0.1:5000"
    assert await target("tcp://localhost:5000", "192.0.2.7") is None
    assert await target("tcp://no-such-host.invalid:5000", "127.0.0.1") is None


# -- the CLI, real processes --------------------------------------------------------------------


@pytest.mark.slow
def test_cli_peer_refused_by_a_closed_rendezvous(swarm: LocalSwarm, tmp_path: Path) -> None:
    key = tmp_path / "peer.pem"
    out = subprocess.run([sys.executable, "-m", "peerlearn", "identity", "--key", str(key)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    peer_id = out.split()[0]
    assert peer_id == Identity.load_or_create(key).peer_id
    (tmp_path / "allowed").write_text(out)  # the output line is a valid list entry
    (tmp_path / "secret").write_bytes(SECRET)
    swarm.start_rendezvous(extra=("--closed", "--job-secret", f"team={tmp_path / 'secret'}"))
    base = [sys.executable, "-m", "peerlearn", "peer", "--num", "0", "--total", "50",
            "--epochs", "1", "--rendezvous", f"127.0.0.1:{swarm.rendezvous_port}",
            "--key", str(key), "--no-progress", "--no-resume"]
    done = subprocess.run([*base, "--job", "team"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if " E " in line]
    assert len(errors) == 1 and errors[0].endswith("not_invited: job team needs a join secret")
    assert "Traceback" not in done.stderr
    # what ps shows holds no secret: the rendezvous got a path
    assert SECRET.decode() not in " ".join(swarm.rendezvous.args)  # type: ignore[union-attr]
    assert json.loads(urllib.request.urlopen(
        f"http://127.0.0.1:{swarm.rendezvous_port}/healthz", timeout=5).read())["peers"] == 0
