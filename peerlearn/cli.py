"""``peerlearn`` subcommands. Each one fills in its config dataclass and runs it.

The rendezvous subcommand imports no torch, so it runs on the base install.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from overlay.membership import JOB_SECRET_ENV
from rendezvous.options import TURN_SECRET_ENV
from rendezvous.options import add_arguments as add_rendezvous_arguments
from rendezvous.options import serve_from_args as serve_rendezvous_from_args

if TYPE_CHECKING:
    from learner.robust import Robust

__all__ = ["TURN_SECRET_ENV", "build_parser", "main"]

log = logging.getLogger("peerlearn")



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


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return value


def _partition(value: str) -> str:
    from learner.partition import parse_partition

    try:
        parse_partition(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _robust(value: str) -> Robust:
    from learner.robust import Robust  # torch: only the peer needs it

    try:
        return Robust.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    p.add_argument("--num", type=int, required=True, help="this peer's shard, 0..TOTAL-1")
    p.add_argument("--total", type=int, required=True, help="number of shards")
    p.add_argument("--rendezvous", "--server", dest="rendezvous", type=_host_port,
                   required=True, help="rendezvous HOST:PORT (--server is the old spelling)")
    p.add_argument("--listen", "--client", dest="listen", type=_host_port, default=None,
                   help="listen for peers on HOST:PORT over ZeroMQ (port 0 picks one; "
                   "--client is the old spelling)")
    p.add_argument("--advertise", type=_host_port, default=None,
                   help="announce this HOST:PORT instead of the listen address")
    p.add_argument("--job", default="mnist", help="swarm name (default mnist)")
    p.add_argument("--dataset", default="digits",
                   choices=["digits", "mnist", "fashion-mnist", "folder"],
                   help="digits: 10,000 real MNIST digits, offline (default); mnist: full MNIST "
                   "(downloads, or IDX files in --data-dir); fashion-mnist: Debian's package; "
                   "folder: your images in --data-dir, ImageFolder layout")
    p.add_argument("--data-dir", default=None, help="look for data set files here first")
    p.add_argument("--data", dest="data_hook", default=None, metavar="MODULE:FUNCTION",
                   help="your own data: a function returning (train, test) datasets")
    p.add_argument("--model", dest="model_spec", default=None, metavar="MODULE:FACTORY",
                   help="your own model: a function returning an nn.Module (default: the "
                   "MNIST CNN); every peer of a job must use the same architecture")
    p.add_argument("--partition", default="iid", type=_partition,
                   help="how the training set is split among peers: iid (default), "
                   "dirichlet:ALPHA (label skew), classes:K (K classes per peer)")
    p.add_argument("--epochs", type=int, default=3, help="local epochs (default 3)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch (default 64)")
    p.add_argument("--lr", type=float, default=1.0, help="Adadelta learning rate (default 1.0)")
    p.add_argument("--gamma", type=float, default=0.7, help="StepLR decay (default 0.7)")
    p.add_argument("--seed", type=int, default=None,
                   help="initial weights seed (default: derived from the job name)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--key", dest="key_file", default=None,
                   help="identity key file (created on first run; default "
                   "~/.local/share/peerlearn/peer-NUM.pem)")
    p.add_argument("--job-secret", dest="job_secret_file", default=None, metavar="PATH",
                   help="closed job: file holding the job's join secret (default: the "
                   f"environment variable {JOB_SECRET_ENV}, if set); members without a valid "
                   "proof of it are ignored")
    p.add_argument("--allow-peers", dest="allow_peers_file", default=None, metavar="PATH",
                   help="closed job: file of the peer ids allowed in the job, one per line "
                   "(# comments); other members are ignored")
    p.add_argument("--merge-wait", type=float, default=60.0,
                   help="seconds to wait for the others' models of an epoch (default 60)")
    p.add_argument("--fanout", type=int, default=None, metavar="K",
                   help="send each epoch's model to K random neighbours (default: everyone)")
    p.add_argument("--staleness-exponent", type=float, default=0.5, metavar="A",
                   help="a model S epochs behind weighs (S+1)^-A times its samples (default "
                   "0.5; 0: no decay)")
    p.add_argument("--max-staleness", type=int, default=10,
                   help="refuse models more epochs behind than this (default 10)")
    p.add_argument("--gate", action="store_true",
                   help="refuse received models that score clearly worse than ours on a "
                   "local validation split (10%% of our data)")
    p.add_argument("--gate-margin", type=float, default=5.0,
                   help="accuracy points below ours that the gate tolerates (default 5)")
    p.add_argument("--robust", default="none", type=_robust,
                   metavar="none|median|trimmed:B|clip:T",
                   help="how received models are combined with ours: none = weighted average "
                   "(default); median = coordinate-wise median; trimmed:B = coordinate-wise "
                   "mean without the B fraction (0 <= B < 0.5, at least one) at each end; "
                   "clip:T = differences from our model scaled down to at most T times the "
                   "median difference norm, then the weighted average. Bounds what a "
                   "poisoned model can do")
    p.add_argument("--codec", default="raw", choices=["raw", "fp16", "int8"],
                   help="how our model travels: raw (default), fp16, int8 (blockwise)")
    p.add_argument("--min-peers", type=int, default=1,
                   help="wait until this many peers (this one included) are in the job "
                   "before training (default 1: start at once)")
    p.add_argument("--min-peers-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="train with whoever is there after waiting this long for --min-peers "
                   "(default 600); a peer resuming from its checkpoint does not wait")
    p.add_argument("--bootstrap-peers", type=int, default=3,
                   help="a newcomer starts from the average of up to this many peers")
    p.add_argument("--bootstrap-timeout", type=float, default=20.0,
                   help="seconds a newcomer waits for its donors (default 20)")
    p.add_argument("--checkpoint", dest="checkpoint_file", default=None,
                   help="saved after every epoch (default ~/.local/share/peerlearn/"
                   "JOB-peer-NUM.ckpt)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start afresh even if a checkpoint exists")
    p.add_argument("--linger", type=float, default=2.0,
                   help="seconds to keep serving after the last epoch (default 2)")
    p.add_argument("--events", dest="events_file", default=None,
                   help="append JSON lines of progress events to this file")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(run=_run_peer)


def _run_peer(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose, f"peer {args.num} ")
    from learner.data import DatasetError
    from learner.peer import PeerConfig, run_peer
    from learner.plugins import PluginError
    from overlay.errors import OverlayError

    fields = {k: v for k, v in vars(args).items() if k not in ("run", "verbose", "command")}
    if args.job_secret_file is None and os.environ.get(JOB_SECRET_ENV):
        fields["job_secret_env"] = JOB_SECRET_ENV
    if args.listen is not None:
        fields["listen"] = args.listen
    try:
        config = PeerConfig(**fields)
        asyncio.run(_until_signal(run_peer(config)))
    except KeyboardInterrupt:
        log.info("stopped")
        return 130
    except (DatasetError, PluginError, OverlayError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return 1
    return 0


async def _until_signal(coro):  # type: ignore[no-untyped-def]
    """Run ``coro``; SIGTERM/SIGINT cancel it so that its clean-up (leave) runs."""
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    stopped = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: (stopped.append(1), task.cancel()))
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
    p.add_argument("--peers", type=int, default=3, help="number of peers (default 3)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per peer (default 3)")
    p.add_argument("--dataset", default="digits",
                   choices=["digits", "mnist", "fashion-mnist", "folder"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--workdir", default=None,
                   help="keep logs, keys and event files here (default: a temporary folder)")
    p.add_argument("--device", default="cpu", help="device for every peer (default cpu)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose, "demo ")
    from peerlearn.demo import DemoConfig, run_demo

    config = DemoConfig(peers=args.peers, epochs=args.epochs, dataset=args.dataset,
                        data_dir=args.data_dir, workdir=args.workdir, device=args.device)
    return run_demo(config)


# ---- data ------------------------------------------------------------------------------------


def _add_data(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("data", help="fetch a data set now, for offline use later")
    p.add_argument("--dataset", default="digits",
                   choices=["digits", "mnist", "fashion-mnist", "folder"])
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
