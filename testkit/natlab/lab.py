"""The lab itself: an internet namespace with a bridge, hosts and NAT homes plugged into it,
its processes, and a state file so that a lab whose owner died can still be torn down."""

from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testkit.natlab.coturn import start_coturn
from testkit.natlab.hosts import Home, Host, Process, UdpAgent
from testkit.natlab.links import LinkProfile, Wire, kill_recorded_wire, resolve_profile, start_wire
from testkit.natlab.rules import NatType, loss_ruleset, nat_ruleset
from testkit.natlab.system import PREFIX, NatLabError, destroy_netns, netns_list, run, terminate

log = logging.getLogger(__name__)

STATE_DIR = Path("/run/peerlearn-natlab")
"""Where every lab records what it created, so ``python -m testkit.natlab down`` can undo it."""

GATEWAY_IP = "203.0.113.100"
"""The internet namespace's own address on the bridge; every bridge host's default route."""

_AUTO_NAME = re.compile(r"^plab[0-9a-f]{4}$")
_AUTO_NETNS = re.compile(r"^plab[0-9a-f]{4}-")
_LAB_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_HOST_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")


class NatLab:
    """A throwaway "internet" of namespaces with NAT routers; ``with NatLab() as lab: ...``.

    Creating it builds the internet namespace with bridge ``br0`` (203.0.113.0/24); hosts and
    homes are added with the methods below. ``close()`` (or leaving the ``with`` block, also on
    an exception) kills every process it started and deletes every namespace, which deletes
    every interface. A state file in ``state_dir`` lets ``python -m testkit.natlab down``
    clean up after a lab whose owner was killed.
    """

    def __init__(self, name: str | None = None, *, state_dir: Path | str | None = STATE_DIR,
                 workdir: Path | str | None = None,
                 profile: LinkProfile | str | None = None) -> None:
        if name is not None and not _LAB_NAME.match(name):
            raise ValueError(f"lab name must match {_LAB_NAME.pattern}: {name!r}")
        self.name = name or f"{PREFIX}{secrets.token_hex(2)}"
        self.profile = resolve_profile(profile)
        """The link profile of homes and public hosts added without one (servers: none)."""
        self.wires: dict[str, Wire] = {}
        """The emulated links, by the name of the home or host they connect."""
        self.hosts: dict[str, Host] = {}
        self.homes: dict[str, Home] = {}
        self.processes: list[Process] = []
        self.namespaces: list[str] = []
        self._popens: list[subprocess.Popen[Any]] = []
        self._agents: list[UdpAgent] = []
        self._next_public = 1
        self._next_home = 1
        self._closed = False
        self._state_file = Path(state_dir) / f"{self.name}.json" if state_dir else None
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.internet = f"{self.name}-inet"
        try:
            self._add_netns(self.internet)
            self._ip(self.internet, "link add br0 type bridge")
            self._ip(self.internet, f"addr add {GATEWAY_IP}/24 dev br0")
            self._ip(self.internet, "link set br0 up")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> NatLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NatLab({self.name!r}, hosts={list(self.hosts)}, homes={list(self.homes)})"

    # -- building

    def _ip(self, netns: str, args: str) -> None:
        run(["ip", "-n", netns, *args.split()])

    def _add_netns(self, netns: str) -> None:
        self._check_open()
        run(["ip", "netns", "add", netns])
        self.namespaces.append(netns)  # only after it exists: never delete someone else's
        self._save_state()
        self._ip(netns, "link set lo up")

    def _check_open(self) -> None:
        if self._closed:
            raise NatLabError(f"lab {self.name} is closed")

    def _check_name(self, name: str) -> None:
        if not _HOST_NAME.match(name):
            raise ValueError(f"host name must match {_HOST_NAME.pattern}: {name!r}")
        if name in self.hosts or name in self.homes:
            raise ValueError(f"lab {self.name} already has a host or home named {name!r}")

    def _attach(self, netns: str, ifname: str, name: str, profile: LinkProfile | None) -> str:
        """Plug ``netns`` into the bridge as ``ifname``: a veth, or with ``profile`` a wire (a
        TAP on each side, uplink from ``netns``); its address, default route via gateway."""
        n = self._next_public
        self._next_public += 1 if n != 99 else 2  # .100 is the gateway
        if n > 254:
            raise NatLabError("the bridge 203.0.113.0/24 is full")
        ip = f"203.0.113.{n}"
        port = f"p{n}"
        if profile is None:
            run(["ip", "link", "add", "name", port, "netns", self.internet, "type", "veth",
                  "peer", "name", ifname, "netns", netns])
        else:
            self._check_open()
            self.wires[name] = start_wire(name, profile, (netns, ifname), (self.internet, port),
                                          self.workdir)
            self._save_state()
        self._ip(self.internet, f"link set {port} master br0 up")
        self._ip(netns, f"addr add {ip}/24 dev {ifname}")
        self._ip(netns, f"link set {ifname} up")
        # NATLAB.md trap 2: coturn needs a default route even to relay towards private addresses.
        self._ip(netns, f"route add default via {GATEWAY_IP}")
        return ip

    def _profile(self, profile: LinkProfile | str | None, default: bool) -> LinkProfile | None:
        resolved = resolve_profile(profile)
        return resolved if resolved is not None or not default else self.profile

    def add_public_host(self, name: str, role: str = "public",
                        profile: LinkProfile | str | None = None) -> Host:
        """A namespace directly on the bridge (no NAT), e.g. a public peer or a reflector.
        ``profile`` (a :class:`LinkProfile` or a name in ``PROFILES``; default the lab's,
        except for servers) emulates its link; None: a plain veth."""
        self._check_name(name)
        link = self._profile(profile, default=role != "server")
        netns = f"{self.name}-{name}"
        self._add_netns(netns)
        host = Host(self, name, netns, self._attach(netns, "eth0", name, link), role)
        self.hosts[name] = host
        self._save_state()
        log.info("natlab %s: %s host %s at %s", self.name, role, name, host.ip)
        return host

    def add_server(self, name: str, profile: LinkProfile | str | None = None) -> Host:
        """A public host for a server (rendezvous, coturn): its own namespace on the bridge;
        unshaped (a data centre) unless ``profile`` is given."""
        return self.add_public_host(name, role="server", profile=profile)

    def add_home(self, name: str, nat: NatType | str = NatType.PORT_RESTRICTED,
                 profile: LinkProfile | str | None = None) -> Home:
        """A router namespace doing ``nat`` (WAN on the bridge, LAN 10.0.K.1/24) and a host
        namespace 10.0.K.2/24 behind it. ``profile`` (default the lab's) emulates the access
        link between the router's WAN and the bridge (uplink: from the home)."""
        nat = NatType(nat)
        self._check_name(name)
        link = self._profile(profile, default=True)
        k = self._next_home
        if k > 254:
            raise NatLabError("no more 10.0.K.0/24 home networks")
        self._next_home += 1
        router_ns, host_ns = f"{self.name}-gw-{name}", f"{self.name}-{name}"
        self._add_netns(router_ns)
        self._add_netns(host_ns)
        public_ip = self._attach(router_ns, "wan", name, link)
        lan_ip, host_ip = f"10.0.{k}.1", f"10.0.{k}.2"
        run(["ip", "link", "add", "name", "lan", "netns", router_ns, "type", "veth",
              "peer", "name", "eth0", "netns", host_ns])
        self._ip(router_ns, f"addr add {lan_ip}/24 dev lan")
        self._ip(router_ns, "link set lan up")
        self._ip(host_ns, f"addr add {host_ip}/24 dev eth0")
        self._ip(host_ns, "link set eth0 up")
        self._ip(host_ns, f"route add default via {lan_ip}")
        run(["ip", "netns", "exec", router_ns, "sh", "-c",
              "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        run(["ip", "netns", "exec", router_ns, "nft", "-f", "-"],
             input=nat_ruleset(nat, host_ip, public_ip))
        router = Host(self, f"gw-{name}", router_ns, public_ip, "router")
        home = Home(name, nat, router, Host(self, name, host_ns, host_ip, "home"), k)
        self.homes[name] = home
        self._save_state()
        log.info("natlab %s: home %s (%s) %s -> %s", self.name, name, nat.value, host_ip,
                 public_ip)
        return home

    def link_stats(self, name: str) -> dict[str, dict[str, int]]:
        """The counters of the emulated link of home or host ``name``: ``{"up": {...},
        "down": {...}}`` with packets, bytes, dropped_queue, dropped_loss, ... (see
        :data:`testkit.natlab.links.COUNTERS`)."""
        wire = self.wires.get(name)
        if wire is None:
            known = ", ".join(self.wires) or "none"
            raise ValueError(f"lab {self.name} has no emulated link for {name!r} "
                             f"(it has a plain veth or does not exist); links: {known}")
        return wire.stats()

    def profile_of(self, name: str) -> LinkProfile | None:
        """The link profile of home or host ``name`` (None: a plain veth)."""
        wire = self.wires.get(name)
        return wire.profile if wire is not None else None

    def loss(self, home: Home, percent: int) -> None:
        """Drop ``percent`` % of the packets crossing ``home``'s WAN, in each direction
        (0 removes it; a new call replaces the old rate)."""
        if not 0 <= percent <= 100:
            raise ValueError(f"loss percent must be 0..100, got {percent}")
        self._check_open()
        run(["ip", "netns", "exec", home.router.netns, "nft", "-f", "-"],
             input=loss_ruleset(percent))

    def loss_dropped(self, home: Home) -> dict[str, int]:
        """Packets the loss rule of ``home`` dropped so far: ``{"in": n, "out": m}`` (zeros
        when there is no loss rule)."""
        self._check_open()
        out = run(["ip", "netns", "exec", home.router.netns, "nft", "-j", "list", "table",
                    "ip", "natlab_loss"], check=False)
        dropped = {"in": 0, "out": 0}
        try:
            items = json.loads(out)["nftables"] if out.strip() else []
        except (ValueError, KeyError, TypeError) as exc:
            raise NatLabError(f"cannot read the loss counters of {home.name}: {exc}") from exc
        for item in items:
            rule = item.get("rule")
            if not rule:
                continue
            for expr in rule.get("expr", []):
                if "counter" in expr:
                    dropped["in" if rule["chain"] == "rx" else "out"] += int(
                        expr["counter"]["packets"])
        return dropped

    # -- processes

    def _spawn(self, host: Host, cmd: Sequence[str] | str,
               popen_kw: dict[str, Any]) -> subprocess.Popen[Any]:
        self._check_open()
        popen_kw.setdefault("start_new_session", True)
        popen = subprocess.Popen(host.argv(cmd), **popen_kw)
        self._popens.append(popen)
        return popen

    def udp_agent(self, host: Host, port: int = 0, reflect: bool = False) -> UdpAgent:
        """A driven UDP socket in ``host`` (see UdpAgent); closed with the lab."""
        agent = UdpAgent(host, port, reflect)
        self._agents.append(agent)
        return agent

    def reflector(self, host: Host, port: int = 7000) -> UdpAgent:
        """A UDP reflector in ``host``: replies ``ip:port`` of each sender."""
        return self.udp_agent(host, port, reflect=True)

    def start_coturn(self, host: Host, secret: str, realm: str = "peerlearn", *,
                     port: int = 3478, min_port: int = 49160, max_port: int = 49200,
                     ready_timeout: float = 10.0) -> Process:
        """Debian's ``turnserver`` in ``host`` (see :func:`testkit.natlab.coturn.start_coturn`);
        stopped with the lab."""
        self._check_open()
        proc = start_coturn(host, self.workdir / f"coturn-{host.name}", secret, realm,
                            port=port, min_port=min_port, max_port=max_port,
                            ready_timeout=ready_timeout)
        self.processes.append(proc)
        self._save_state()
        log.info("natlab %s: coturn on %s:%d", self.name, host.ip, port)
        return proc

    # -- teardown

    def close(self) -> None:
        """Kill every process this lab started, delete every namespace; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            terminate(self._popens)
            for agent in self._agents:
                agent._reader.join(timeout=5)
        finally:
            try:
                terminate([w.popen for w in self.wires.values()])
            finally:
                self._destroy()

    def _destroy(self) -> None:
        destroy_netns(list(reversed(self.namespaces)))
        if self._state_file is not None:
            self._state_file.unlink(missing_ok=True)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        log.info("natlab %s: torn down", self.name)

    def detach(self) -> None:
        """Leave everything running (for the CLI's ``up``); ``down`` removes it later."""
        self._save_state()
        self._closed = True

    # -- state file

    def describe(self) -> dict[str, Any]:
        """Everything the lab made, as JSON-ready data (the state file's content)."""
        return {
            "name": self.name,
            "internet": {"netns": self.internet, "ip": GATEWAY_IP, "bridge": "br0"},
            "namespaces": self.namespaces,
            "workdir": str(self.workdir),
            "profile": self.profile.name if self.profile else None,
            "hosts": {h.name: {"netns": h.netns, "ip": h.ip, "role": h.role,
                               "profile": self._profile_name(h.name)}
                      for h in self.hosts.values()},
            "homes": {
                m.name: {"nat": m.nat.value, "netns": m.host.netns, "ip": m.host.ip,
                         "router_netns": m.router.netns, "public_ip": m.public_ip,
                         "profile": self._profile_name(m.name)}
                for m in self.homes.values()
            },
            "wires": {name: w.describe() for name, w in self.wires.items()},
            "processes": [{"name": p.name, "netns": p.host.netns, "pid": p.pid,
                           "log": str(p.log_path)} for p in self.processes],
        }

    def _profile_name(self, name: str) -> str | None:
        profile = self.profile_of(name)
        return profile.name if profile else None

    def _save_state(self) -> None:
        if self._state_file is None:
            return
        try:
            self._state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.describe(), indent=2) + "\n")
            tmp.replace(self._state_file)
        except OSError as exc:
            log.warning("natlab %s: cannot write state file: %s", self.name, exc)


def teardown(name: str, state_dir: Path = STATE_DIR) -> bool:
    """Delete a lab recorded in ``state_dir`` (processes, namespaces, its files); False if
    there is no such lab."""
    path = state_dir / f"{name}.json"
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        state = None
    namespaces = list(state["namespaces"]) if state else []
    if _AUTO_NAME.match(name):  # also what a lab that died before saving state left behind
        namespaces += [ns for ns in netns_list() if ns.startswith(f"{name}-")]
    if not namespaces and state is None:
        return False
    for wire in (state or {}).get("wires", {}).values():
        kill_recorded_wire(int(wire["pid"]), str(wire["stats"]))
    destroy_netns(list(dict.fromkeys(reversed(namespaces))))
    if state is not None:
        workdir = Path(state.get("workdir", ""))
        if workdir.is_relative_to(state_dir) and workdir != state_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    path.unlink(missing_ok=True)
    return True


def teardown_all(state_dir: Path = STATE_DIR) -> list[str]:
    """Delete every recorded lab and every namespace named like an automatic lab."""
    names = {p.stem for p in state_dir.glob("*.json")} if state_dir.is_dir() else set()
    names |= {ns.split("-", 1)[0] for ns in netns_list() if _AUTO_NETNS.match(ns)}
    return [name for name in sorted(names) if teardown(name, state_dir)]

