"""Command-line options of the rendezvous, shared by ``peerlearn rendezvous`` and
``python -m rendezvous``: they only fill in ``RendezvousConfig``."""

from __future__ import annotations

import argparse
import logging
import os
from collections import defaultdict
from pathlib import Path

from overlay.membership import JobPolicy, policy_from_files, split_assignment
from rendezvous.config import RendezvousConfig

log = logging.getLogger(__name__)

TURN_SECRET_ENV = "PEERLEARN_TURN_SECRET"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The rendezvous' options (defaults from ``RendezvousConfig``)."""
    d = RendezvousConfig()
    parser.add_argument("--host", default=d.host, help=f"address to bind (default {d.host})")
    parser.add_argument("--port", type=int, default=d.port,
                        help=f"HTTP/WebSocket port (default {d.port})")
    parser.add_argument("--ttl", type=float, default=d.ttl,
                        help=f"seconds without a heartbeat before a peer is dropped "
                        f"(default {d.ttl:g})")
    parser.add_argument("--heartbeat", "--heartbeat-interval", dest="heartbeat", type=float,
                        default=d.heartbeat_interval,
                        help=f"heartbeat interval told to peers, seconds "
                        f"(default {d.heartbeat_interval:g})")
    parser.add_argument("--dialback-timeout", type=float, default=d.dialback_timeout,
                        help="bound on one dial-back of an offered ZeroMQ address, seconds "
                        f"(default {d.dialback_timeout:g})")
    parser.add_argument("--stun-port", type=int, default=d.stun_port,
                        help="UDP port of the built-in STUN server, bound on --host "
                        f"(default {d.stun_port}; 0 picks a free port; -1 disables STUN)")
    parser.add_argument("--public-host", default=None, metavar="HOST",
                        help="host name or IP of this server as peers reach it, used in the "
                        "stun: URL given to peers (default: the host each peer connected to)")
    parser.add_argument("--turn-url", dest="turn_urls", action="append", default=[],
                        metavar="URL",
                        help="a coturn URL handed to peers with short-lived credentials, e.g. "
                        "turn:turn.example.org:3478 or turn:HOST:3478?transport=tcp "
                        "(repeatable; needs --turn-secret)")
    parser.add_argument("--turn-secret", default=os.environ.get(TURN_SECRET_ENV), metavar="S",
                        help="coturn's static-auth-secret (use-auth-secret); better set in the "
                        f"environment as {TURN_SECRET_ENV} so it does not show in ps")
    parser.add_argument("--turn-ttl", type=float, default=d.turn_ttl,
                        help=f"lifetime of the TURN credentials, seconds (default {d.turn_ttl:g})")
    closed = parser.add_argument_group(
        "closed jobs", "Admit only invited peers to a job: those that know its join secret "
        "and/or whose peer id is on its list (`peerlearn identity` prints a peer's id)."
    )
    closed.add_argument("--job-secret", action="append", default=[], metavar="JOB=PATH",
                        help="job JOB needs the join secret in file PATH (repeatable)")
    closed.add_argument("--job-secret-env", action="append", default=[], metavar="JOB=VAR",
                        help="job JOB needs the join secret held by environment variable VAR")
    closed.add_argument("--allow-peers", action="append", default=[], metavar="JOB=PATH",
                        help="only the peer ids listed in file PATH (one per line, # comments) "
                        "may join job JOB")
    closed.add_argument("--closed", action="store_true",
                        help="refuse every job not named by the options above")
    parser.add_argument("--expose-addresses", action="store_true",
                        help="show the peers' ZeroMQ addresses on GET /peers and the dashboard "
                        "(default: only whether each is reachable)")
    parser.add_argument("--dialback-any-host", action="store_true",
                        help="dial back addresses on any host, not only on the IP the peer "
                        "connects from (behind a reverse proxy)")
    parser.add_argument("--ready-file", type=Path, default=None, metavar="PATH",
                        help='once serving, write {"port": P, "stun_port": S} (the bound ports, '
                        "JSON) to PATH, atomically; removed at shutdown")
    parser.add_argument("--message-rate", type=float, default=d.message_rate,
                        help="messages per second allowed per peer session "
                        f"(default {d.message_rate:g}; burst {d.message_burst:g}; 0: no limit)")


def job_policies(args: argparse.Namespace) -> dict[str, JobPolicy]:
    """``--job-secret`` / ``--job-secret-env`` / ``--allow-peers`` as policies by job."""
    sources: dict[str, dict[str, str]] = defaultdict(dict)
    for option, key in (("job_secret", "secret_file"), ("job_secret_env", "secret_env"),
                        ("allow_peers", "allow_peers_file")):
        flag = "--" + option.replace("_", "-")
        for value in getattr(args, option):
            job, rest = split_assignment(value, flag)
            if key in sources[job]:
                raise ValueError(f"{flag} given twice for job {job}")
            sources[job][key] = rest
    policies: dict[str, JobPolicy] = {}
    for job, given in sources.items():
        try:
            policy = policy_from_files(**given)
        except ValueError as exc:
            raise ValueError(f"job {job}: {exc}") from None
        if policy is not None:
            policies[job] = policy
    return policies


def config_from_args(args: argparse.Namespace) -> RendezvousConfig:
    """The config the options describe; ValueError (one clear line) when they do not fit."""
    return RendezvousConfig(
        host=args.host, port=args.port, ttl=args.ttl, heartbeat_interval=args.heartbeat,
        dialback_timeout=args.dialback_timeout, stun_port=args.stun_port,
        public_host=args.public_host, turn_urls=args.turn_urls,
        turn_secret=args.turn_secret or None, turn_ttl=args.turn_ttl,
        jobs=job_policies(args), closed=args.closed, expose_addresses=args.expose_addresses,
        dialback_any_host=args.dialback_any_host, message_rate=args.message_rate,
    )


def serve_from_args(args: argparse.Namespace) -> int:
    """Serve with the parsed options until SIGINT/SIGTERM; the process' exit status (2: bad
    options, 1: cannot bind). Errors are logged as one line each."""
    from rendezvous.server import serve

    try:
        config = config_from_args(args)
    except ValueError as exc:
        log.error("rendezvous: %s", exc)
        return 2
    try:
        serve(config, ready_file=getattr(args, "ready_file", None))
    except OSError as exc:  # a port already taken, an address not ours
        log.error("rendezvous: cannot bind: %s", exc)
        return 1
    return 0
