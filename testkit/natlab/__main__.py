"""``python -m testkit.natlab up|down|list|status|verify|agent|reflect``: build a lab and leave
it running (``--profile``: emulated links), tear labs down, show them with their links'
counters, verify the link emulator, and the UDP agent the lab runs inside its namespaces."""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from testkit.natlab.hosts import agent_main
from testkit.natlab.lab import GATEWAY_IP, STATE_DIR, NatLab, teardown, teardown_all
from testkit.natlab.links import PROFILES, read_stats, resolve_profile, wire_available
from testkit.natlab.rules import NatType
from testkit.natlab.system import PREFIX, NatLabError, available


def _print_lab(lab: NatLab, secret: str | None) -> None:
    print(f"lab {lab.name}: internet namespace {lab.internet}, bridge br0 {GATEWAY_IP}/24")
    for h in lab.hosts.values():
        print(f"  {h.role:<8} {h.name:<10} {h.ip:<15} ip netns exec {h.netns} bash"
              f"{_link(lab, h.name)}")
    for m in lab.homes.values():
        print(f"  home     {m.name:<10} {m.host.ip:<15} ip netns exec {m.host.netns} bash"
              f"   ({m.nat.value} NAT -> {m.public_ip}, router {m.router.netns})"
              f"{_link(lab, m.name)}")
    for p in lab.processes:
        print(f"  coturn   {p.host.ip}:3478 pid {p.pid}, secret {secret}, log {p.log_path}")
    if "rdv" in lab.hosts:
        rdv = lab.hosts["rdv"]
        print(f"rendezvous: ip netns exec {rdv.netns} peerlearn rendezvous --host {rdv.ip}")
    print(f"tear down:  python -m testkit.natlab down {lab.name}")


def _link(lab: NatLab, name: str) -> str:
    wire = lab.wires.get(name)
    if wire is None:
        return ""
    return f"\n           link {wire.profile.name}: {wire.profile.summary()} (wire pid {wire.pid})"


def _status(name: str | None) -> int:
    paths = sorted(STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []
    if name is not None:
        paths = [p for p in paths if p.stem == name]
        if not paths:
            print(f"natlab: no lab {name}", file=sys.stderr)
            return 1
    for path in paths:
        state = json.loads(path.read_text())
        print(f"lab {state['name']} (default profile {state.get('profile') or 'none'})")
        entries = [(n, h["role"], h["ip"], h.get("profile")) for n, h in state["hosts"].items()]
        entries += [(n, f"home/{m['nat']}", m["public_ip"], m.get("profile"))
                    for n, m in state["homes"].items()]
        for n, role, ip, profile in entries:
            line = f"  {n:<10} {role:<22} {ip:<15} link {profile or 'veth (none)'}"
            wire = state.get("wires", {}).get(n)
            if wire is not None:
                try:
                    stats = read_stats(Path(wire["stats"]))
                    line += f", wire pid {wire['pid']}" + "".join(
                        f"\n      {d:<4} {c['packets']} packets {c['bytes']} bytes, dropped "
                        f"{c['dropped_queue']} queue {c['dropped_loss']} loss"
                        for d, c in stats.items())
                except (OSError, NatLabError) as exc:
                    line += f", wire stats unreadable: {exc}"
            print(line)
    return 0


def _home_profiles(specs: Sequence[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        home, sep, profile = spec.partition("=")
        if not sep or not home:
            raise ValueError(f"--home-profile wants HOME=PROFILE, got {spec!r}")
        resolve_profile(profile)
        out[home] = profile
    return out


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
    up.add_argument("--profile", choices=list(PROFILES), default=None,
                    help="link profile of every home and public host (servers stay unshaped)")
    up.add_argument("--home-profile", action="append", default=[], metavar="HOME=PROFILE",
                    help="link profile of one home (home1, home2, ...), repeatable")
    up.add_argument("--server-profile", choices=list(PROFILES), default=None,
                    help="link profile of the servers (rdv, turn); default none")
    down = sub.add_parser("down", help="tear down a lab")
    down.add_argument("name", nargs="?")
    down.add_argument("--all", action="store_true", help="every lab on this machine")
    sub.add_parser("list", help="labs recorded in " + str(STATE_DIR))
    status = sub.add_parser("status", help="labs with their link profiles and wire counters")
    status.add_argument("name", nargs="?")
    verify_cmd = sub.add_parser("verify", help="measure the link emulator against a profile")
    verify_cmd.add_argument("--profile", choices=list(PROFILES), required=True)
    verify_cmd.add_argument("--seconds", type=float, default=3.0,
                            help="length of each TCP bulk transfer at the set rate")
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
    if args.cmd == "status":
        return _status(args.name)
    reason = available(coturn=args.cmd == "up" and args.coturn)
    wired = args.cmd == "verify" or (args.cmd == "up" and (
        args.profile or args.home_profile or args.server_profile))
    if reason is None and wired:
        reason = wire_available()
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

    if args.cmd == "verify":
        from testkit.natlab.verify import HEADER, verify

        print(f"verify {args.profile}: {PROFILES[args.profile].summary()}")
        print(HEADER)
        checks = verify(args.profile, seconds=args.seconds,
                        report=lambda c: print(c.line(), flush=True))
        bad = [c.quantity for c in checks if not c.ok]
        print(json.dumps({"profile": args.profile, "ok": not bad, "failed": bad,
                          "checks": [dict(c.__dict__) for c in checks]}))
        return 1 if bad else 0

    try:
        nats = [NatType(n.strip()) for n in args.homes.split(",") if n.strip()]
        home_profiles = _home_profiles(args.home_profile)
    except ValueError as exc:
        parser.error(str(exc))
    unknown = set(home_profiles) - {f"home{i + 1}" for i in range(len(nats))}
    if unknown:
        parser.error(f"--home-profile names no such home: {', '.join(sorted(unknown))}")
    name = args.name or f"{PREFIX}{secrets.token_hex(2)}"
    lab = NatLab(name, workdir=STATE_DIR / name, profile=args.profile)
    secret = None
    try:
        lab.add_server("rdv", profile=args.server_profile)
        if args.coturn:
            secret = args.secret or secrets.token_hex(8)
            lab.start_coturn(lab.add_server("turn", profile=args.server_profile), secret)
        for i in range(args.public):
            lab.add_public_host(f"pub{i + 1}")
        for i, nat in enumerate(nats):
            lab.add_home(f"home{i + 1}", nat, profile=home_profiles.get(f"home{i + 1}"))
    except BaseException:
        lab.close()
        raise
    lab.detach()
    _print_lab(lab, secret)
    return 0


if __name__ == "__main__":
    sys.exit(main())
