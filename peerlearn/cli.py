"""``peerlearn`` subcommands. Each one fills in its config dataclass and runs it.

The rendezvous subcommand imports no torch, so it runs on the base install.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from dataclasses import fields
from typing import Any, TypeVar

from learner.config import DATASET_CHOICES
from learner.options import add_arguments as add_peer_arguments
from learner.options import add_fields
from learner.options import from_args as peer_config_from_args
from rendezvous.options import TURN_SECRET_ENV
from rendezvous.options import add_arguments as add_rendezvous_arguments
from rendezvous.options import serve_from_args as serve_rendezvous_from_args

__all__ = ["TURN_SECRET_ENV", "build_parser", "main"]

log = logging.getLogger("peerlearn")

T = TypeVar("T")


def _setup_logging(verbose: int, prefix: str = "") -> None:
    level = logging.DEBUG if verbose > 0 else logging.INFO
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {prefix}%(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if verbose <= 1:  # libraries' debug chatter only with -vv
        for noisy in ("aiohttp.access", "asyncio", "aioice", "aiortc"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


# ---- rendezvous ------------------------------------------------------------------------------


def _add_rendezvous(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("rendezvous", help="run the rendezvous (tracker) service",
                       description="Run the rendezvous: HTTP + WebSocket; introduces peers, "
                       "dials back their addresses, pushes joined/left events, relays WebRTC "
                       "signaling, answers STUN on UDP and hands out TURN credentials for a "
                       "coturn server (use-auth-secret). No public STUN/TURN server is ever "
                       "handed out unless given here.")
    add_rendezvous_arguments(p)
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(run=_run_rendezvous)


def _run_rendezvous(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose, "rendezvous ")
    return serve_rendezvous_from_args(args)


# ---- peer ------------------------------------------------------------------------------------


def _add_peer(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("peer", help="run one training peer",
                       description="Train on shard NUM of TOTAL and exchange models with the "
                       "other peers of the job after every epoch.")
    add_peer_arguments(p)
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(run=_run_peer)


def _run_peer(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose, f"peer {args.num} ")
    from learner import peer  # torch: only the peer needs it
    from learner.data import DatasetError
    from learner.plugins import PluginError
    from overlay.errors import OverlayError

    try:
        config = peer_config_from_args(args)
        asyncio.run(_until_signal(peer.run_peer(config)))
    except KeyboardInterrupt:
        log.info("stopped")
        return 130
    except (DatasetError, PluginError, OverlayError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return 1
    return 0


async def _until_signal(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``; SIGTERM/SIGINT cancel it so that its clean-up (leave) runs."""
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    stopped: list[int] = []

    def stop() -> None:
        stopped.append(1)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        return await task
    except asyncio.CancelledError:
        if stopped:
            raise KeyboardInterrupt from None
        raise


# ---- identity --------------------------------------------------------------------------------


def _add_identity(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("identity", help="print the peer id of a key file (created if missing)",
                       description="Print the peer id and public key of an identity key file, "
                       "creating the key first if it does not exist. The output line is "
                       "ready to append to a closed job's --allow-peers file.")
    p.add_argument("--key", "--identity", dest="key_file", required=True, metavar="PATH",
                   help="the key file, as given to `peerlearn peer --key` (a peer's default "
                   "is ~/.local/share/peerlearn/peer-NUM.pem)")
    p.set_defaults(run=_run_identity, verbose=0)


def _run_identity(args: argparse.Namespace) -> int:
    _setup_logging(0)
    from overlay.identity import Identity

    try:
        identity = Identity.load_or_create(args.key_file)
    except (ValueError, OSError) as exc:
        log.error("%s", exc)
        return 1
    print(f"{identity.peer_id}  # {args.key_file}, public key {identity.public_key.hex()}")
    return 0


# ---- demo ------------------------------------------------------------------------------------


def _add_demo(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="a local swarm: rendezvous + N peers on loopback",
                       description="Start a rendezvous and N peers as separate processes on "
                       "loopback, show their progress, and end with a table. Ctrl+C stops all.")
    from peerlearn.demo import DemoConfig  # no torch

    add_fields(p, DemoConfig)
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose, "demo ")
    from peerlearn.demo import DemoConfig, run_demo

    config = DemoConfig(**{f.name: getattr(args, f.name) for f in fields(DemoConfig)
                           if hasattr(args, f.name)})
    return run_demo(config)


# ---- data ------------------------------------------------------------------------------------


def _add_data(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("data", help="fetch a data set now, for offline use later")
    p.add_argument("--dataset", default="digits",
                   choices=DATASET_CHOICES)
    p.add_argument("--data-dir", default=None)
    p.set_defaults(run=_run_data, verbose=0)


def _run_data(args: argparse.Namespace) -> int:
    _setup_logging(0)
    from learner.data import DatasetError, load_dataset

    try:
        train, test = load_dataset(args.dataset, args.data_dir)
    except DatasetError as exc:
        log.error("%s", exc)
        return 1
    print(f"{args.dataset}: {len(train)} training and {len(test)} test images ready")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peerlearn",
        description="Decentralized learning: peers train on private data and exchange "
        "weights peer to peer; a rendezvous introduces them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_rendezvous(sub)
    _add_peer(sub)
    _add_identity(sub)
    _add_demo(sub)
    _add_data(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
