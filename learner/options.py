"""``peerlearn peer``'s options, built from :mod:`learner.config`'s fields (no torch here).

:func:`add_arguments` adds one option per config field that has command-line flags, with the
field's default and help, grouped by section; :func:`from_args` fills in a
:class:`~learner.config.PeerConfig` from the parsed arguments; :func:`to_argv` writes a config
back as a command line (what the demo starts its peers with).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import Field, fields
from typing import TYPE_CHECKING, Any

from learner.config import SECTIONS, PeerConfig
from overlay.membership import JOB_SECRET_ENV

if TYPE_CHECKING:
    from learner.robust_rule import Robust

__all__ = ["add_arguments", "add_fields", "cli_fields", "from_args", "to_argv"]


def host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return value


def partition(value: str) -> str:
    from learner.partition import parse_partition  # numpy: only the peer needs it

    try:
        parse_partition(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def robust(value: str) -> Robust:
    from learner.robust_rule import Robust

    try:
        return Robust.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int, "float": float, "host_port": host_port, "partition": partition,
    "robust": robust,
}
_ACTIONS = ("store_true", "store_false")


def cli_fields() -> Iterator[tuple[str, Field[Any]]]:
    """(section or "" for PeerConfig's own fields, field) for every field with flags."""
    for f in fields(PeerConfig):
        if f.name in SECTIONS:
            for g in fields(SECTIONS[f.name]):
                if g.metadata.get("flags"):
                    yield f.name, g
        elif f.metadata.get("flags"):
            yield "", f


def add_field(group: argparse._ActionsContainer, f: Field[Any]) -> None:
    """The option of one field made by :func:`learner.config.option`."""
    meta = f.metadata
    kind = meta["kind"]
    kwargs: dict[str, Any] = {"dest": f.name, "help": meta["help"].replace("%", "%%")}
    if kind in _ACTIONS:
        kwargs["action"] = kind
    else:
        if kind is not None:
            kwargs["type"] = _PARSERS[kind]
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
        if meta["metavar"] is not None:
            kwargs["metavar"] = meta["metavar"]
        if f.default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
            if f.default is not None:
                kwargs["help"] += " (default %(default)s)"
    group.add_argument(*meta["flags"], **kwargs)


def add_fields(group: argparse._ActionsContainer, cls: type[Any]) -> list[str]:
    """The options of the fields of dataclass ``cls`` that have flags; their names."""
    names = []
    for f in fields(cls):
        if f.metadata.get("flags"):
            add_field(group, f)
            names.append(f.name)
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per config field with flags: its default, its help, its section's group."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for section, f in cli_fields():
        if section not in groups:
            doc = SECTIONS[section].__doc__ if section else "this peer and its rendezvous"
            groups[section] = parser.add_argument_group(section or "peer", doc)
        add_field(groups[section], f)


def from_args(args: argparse.Namespace) -> PeerConfig:
    """The config the parsed ``peerlearn peer`` arguments describe. A closed job's secret
    comes from ``$PEERLEARN_JOB_SECRET`` when no ``--job-secret`` file is given."""
    values = {f.name: getattr(args, f.name) for _, f in cli_fields()}
    if values["job_secret_file"] is None and os.environ.get(JOB_SECRET_ENV):
        values["job_secret_env"] = JOB_SECRET_ENV
    return PeerConfig(**values)


def to_argv(config: PeerConfig, omit: Sequence[str] = ()) -> list[str]:
    """``config`` as ``peerlearn peer`` options (fields at their default left out, and those
    named in ``omit``). ValueError for a field set away from its default that has no flag
    (a data set or model factory given as an object, limits, job_secret_env)."""
    flat = config.flat()
    with_flags = set()
    argv: list[str] = []
    for _, f in cli_fields():
        with_flags.add(f.name)
        value = flat[f.name]
        if f.name in omit or (f.default is not dataclasses.MISSING and value == f.default):
            continue
        flag, kind = f.metadata["flags"][0], f.metadata["kind"]
        argv += [flag] if kind in _ACTIONS else [flag, str(value)]
    for section in SECTIONS.values():
        for f in fields(section):
            if f.name not in with_flags and flat[f.name] != f.default:
                raise ValueError(f"{f.name} has no command-line option")
    return argv
