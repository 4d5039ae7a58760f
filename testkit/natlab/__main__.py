"""``python -m testkit.natlab up|down|list|agent|reflect``: build a lab and leave it running,
tear labs down, and the UDP agent the lab runs inside its namespaces."""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
from collections.abc import Sequence

from testkit.natlab.hosts import agent_main
from testkit.natlab.lab import GATEWAY_IP, STATE_DIR, NatLab, teardown, teardown_all
from testkit.natlab.rules import NatType
from testkit.natlab.system import PREFIX, available


def _print_lab(lab: NatLab, secret: str | None) -> None:
    print(f"lab {lab.name}: internet namespace {lab.internet}, bridge br0 {GATEWAY_IP}/24")
    for h in lab.hosts.values():
        print(f"  {h.role:<8} {h.name:<10} {h.ip:<15} ip netns exec {h.netns} bash")
    for m in lab.homes.values():
        print(f"  home     {m.name:<10} {m.host.ip:<15} ip netns exec {m.host.netns} bash"
              f"   ({m.nat.value} NAT -> {m.public_ip}, router {m.router.netns})")
    for p in lab.processes:
        print(f"  coturn   {p.host.ip}:3478 pid {p.pid}, secret {secret}, log {p.log_path}")
    if "rdv" in lab.hosts:
        rdv = lab.hosts["rdv"]
        print(f"rendezvous: ip netns exec {rdv.netns} peerlearn rendezvous --host {rdv.ip}")
    print(f"tear down:  python -m testkit.natlab down {lab.name}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testkit.natlab",
                                     description="real NATs in network namespaces")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a lab and leave it running")
    up.add_argument("--homes", default="port-restricted,symmetric",
                    help=f"comma-separated NAT types, one home each: {', '.join(NatType)}")
    up.add_argument("--public", type=int, default=0, help="public hosts (no NAT)")
    up.add_argument("--coturn", action="store_true", help="run coturn in server namespace 'turn'")
    up.add_argument("--secret", default=None, help="coturn static-auth-secret (default random)")
    up.add_argument("--name", default=None, help="lab name (default plab + random hex)")
    down = sub.add_parser("down", help="tear down a lab")
    down.add_argument("name", nargs="?")
    down.add_argument("--all", action="store_true", help="every lab on this machine")
    sub.add_parser("list", help="labs recorded in " + str(STATE_DIR))
    for cmd in ("agent", "reflect"):
        p = sub.add_parser(cmd, help="UDP agent (used inside namespaces by the lab)")
        p.add_argument("--port", type=int, default=0)
        p.add_argument("--reflect", action="store_true", default=cmd == "reflect")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname).1s %(name)s: %(message)s")

    if args.cmd in ("agent", "reflect"):
        agent_main(args.port, args.reflect)
        return 0
    if args.cmd == "list":
        for path in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []:
            state = json.loads(path.read_text())
            print(path.stem, " ".join(f"{n}={h['ip']}" for n, h in state["hosts"].items()),
                  " ".join(f"{n}={m['nat']}" for n, m in state["homes"].items()))
        return 0
    reason = available(coturn=args.cmd == "up" and args.coturn)
    if reason is not None:
        print(f"natlab: {reason}", file=sys.stderr)
        return 2
    if args.cmd == "down":
        if args.all:
            print("removed:", " ".join(teardown_all()) or "nothing")
            return 0
        if not args.name:
            parser.error("down needs a lab NAME or --all")
        if not teardown(args.name):
            print(f"natlab: no lab {args.name}", file=sys.stderr)
            return 1
        return 0

    try:
        nats = [NatType(n.strip()) for n in args.homes.split(",") if n.strip()]
    except ValueError as exc:
        parser.error(str(exc))
    name = args.name or f"{PREFIX}{secrets.token_hex(2)}"
    lab = NatLab(name, workdir=STATE_DIR / name)
    secret = None
    try:
        lab.add_server("rdv")
        if args.coturn:
            secret = args.secret or secrets.token_hex(8)
            lab.start_coturn(lab.add_server("turn"), secret)
        for i in range(args.public):
            lab.add_public_host(f"pub{i + 1}")
        for i, nat in enumerate(nats):
            lab.add_home(f"home{i + 1}", nat)
    except BaseException:
        lab.close()
        raise
    lab.detach()
    _print_lab(lab, secret)
    return 0


if __name__ == "__main__":
    sys.exit(main())
