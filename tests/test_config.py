"""One configuration: the CLI's `peerlearn peer` options are PeerConfig's fields, with the
same defaults, and the demo, the CLI and the Python API build the same configs."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from learner.config import (
    CODEC_CHOICES,
    SECTIONS,
    DataConfig,
    MergeConfig,
    NetworkConfig,
    PeerConfig,
    TrainConfig,
)
from learner.options import cli_fields, from_args, to_argv
from learner.robust_rule import Robust
from peerlearn.cli import build_parser
from peerlearn.demo import DemoConfig, peer_config, peer_extra_args
from peerlearn.launch import Launcher


def _peer_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["peer"]


def _config_fields() -> dict[str, dataclasses.Field[object]]:
    found = {f.name: f for f in dataclasses.fields(PeerConfig) if f.name not in SECTIONS}
    for cls in SECTIONS.values():
        found.update({f.name: f for f in dataclasses.fields(cls)})
    return found


def _parse(argv: list[str]) -> PeerConfig:
    args = build_parser().parse_args(argv)
    assert args.command == "peer"
    return from_args(args)


def test_every_peer_flag_is_a_config_field_with_the_same_default() -> None:
    fields = _config_fields()
    checked = 0
    for action in _peer_parser()._actions:
        if action.dest in ("help", "verbose"):
            continue
        assert action.dest in fields, f"{action.option_strings} maps to no config field"
        field = fields[action.dest]
        if field.default is dataclasses.MISSING:
            assert action.required, action.option_strings
        else:
            assert action.default == field.default, (action.option_strings, action.default)
            assert not action.required
        assert action.help and field.metadata["help"].replace("%", "%%") in action.help
        checked += 1
    assert checked == len(list(cli_fields()))
    spelled = {flag for action in _peer_parser()._actions for flag in action.option_strings}
    # every spelling of the CLI before the sections, and the ones added since, no more
    assert spelled == OLD_FLAGS | NEW_FLAGS


OLD_FLAGS = {
    "--advertise", "--allow-peers", "--batch-size", "--bootstrap-peers", "--bootstrap-timeout",
    "--checkpoint", "--client", "--codec", "--data", "--data-dir", "--dataset", "--device",
    "--epochs", "--events", "--fanout", "--gamma", "--gate", "--gate-margin", "--help", "--job",
    "--job-secret", "--key", "--linger", "--listen", "--lr", "--max-staleness", "--merge-wait",
    "--min-peers", "--min-peers-timeout", "--model", "--no-progress", "--no-resume", "--num",
    "--partition", "--rendezvous", "--robust", "--seed", "--server", "--staleness-exponent",
    "--threads", "--total", "--verbose", "-h", "-v"}
NEW_FLAGS = {"--lanes", "--graph"}  # issues 11, 12


def test_the_old_spellings_and_defaults_still_parse() -> None:
    config = _parse(["peer", "--num", "1", "--total", "3", "--server", "10.0.0.1:5555",
                     "--client", "0.0.0.0:0"])
    assert config.rendezvous == "10.0.0.1:5555" and config.network.listen == "0.0.0.0:0"
    assert config == PeerConfig(1, 3, "10.0.0.1:5555", listen="0.0.0.0:0")
    assert config.train.epochs == 3 and config.merge.merge_wait == 60.0
    assert config.merge.robust == Robust() and config.files.resume and config.train.progress
    flags = _parse(["peer", "--num", "0", "--total", "2", "--rendezvous", "h:1", "--gate",
                    "--no-resume", "--no-progress", "--robust", "trimmed:0.25", "--fanout", "2",
                    "--codec", "fp16", "--data", "m:f", "--model", "m:g", "--key", "k.pem"])
    assert flags.merge.gate and not flags.files.resume and not flags.train.progress
    assert flags.merge.robust == Robust.parse("trimmed:0.25") and flags.merge.fanout == 2
    assert (flags.network.codec, flags.data.data_hook, flags.train.model_spec,
            flags.files.key_file) == ("fp16", "m:f", "m:g", "k.pem")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["peer", "--num", "0", "--total", "1", "--rendezvous", "x"])


def test_job_secret_comes_from_the_environment_without_a_file(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERLEARN_JOB_SECRET", "s3cret-s3cret-s3cret")
    argv = ["peer", "--num", "0", "--total", "1", "--rendezvous", "h:1"]
    assert _parse(argv).access.job_secret_env == "PEERLEARN_JOB_SECRET"
    assert _parse([*argv, "--job-secret", "f"]).access.job_secret_env is None


def test_flat_and_sectioned_construction_are_the_same_config() -> None:
    flat = PeerConfig(num=0, total=3, rendezvous="h:1", epochs=5, merge_wait=9.0, job="j",
                      dataset="mnist", key_file="k")
    sectioned = PeerConfig(0, 3, "h:1", train=TrainConfig(epochs=5),
                           merge=MergeConfig(merge_wait=9.0), network=NetworkConfig(job="j"),
                           data=DataConfig(dataset="mnist"))
    sectioned.files = dataclasses.replace(sectioned.files, key_file="k")
    assert flat == sectioned
    assert flat.epochs == flat.train.epochs == 5 and flat.job == "j"  # flat reads work too
    # a flat field given with its section replaces just that field of it
    both = PeerConfig(0, 1, "h:1", train=TrainConfig(epochs=5, lr=0.5), epochs=7)
    assert (both.train.epochs, both.train.lr) == (7, 0.5)
    assert dataclasses.replace(flat, num=2).num == 2
    with pytest.raises(TypeError, match="unknown fields"):
        PeerConfig(0, 1, "h:1", epoch=3)
    with pytest.raises(AttributeError):
        _ = flat.nothing_like_this


@pytest.mark.parametrize("bad", [dict(num=3, total=3), dict(codec="zip"), dict(fanout=0),
                                 dict(train_set=object())])
def test_invalid_configs_are_refused(bad: dict[str, object]) -> None:
    values: dict[str, object] = {"num": 0, "total": 1, "rendezvous": "h:1", **bad}
    with pytest.raises(ValueError):
        PeerConfig(**values)  # type: ignore[arg-type]


def test_codec_choices_are_the_overlays_codecs() -> None:
    from overlay.codecs import CODECS

    assert sorted(CODEC_CHOICES) == sorted(CODECS)


def test_to_argv_round_trips_and_refuses_what_has_no_flag() -> None:
    config = PeerConfig(2, 4, "h:5", epochs=1, gate=True, resume=False, robust=Robust.parse(
        "clip:2"), listen="127.0.0.1:0", partition="classes:2", threads=2)
    assert _parse(["peer", *to_argv(config)]) == config
    with pytest.raises(ValueError, match="limits"):
        from overlay.wire import Limits

        to_argv(PeerConfig(0, 1, "h:1", limits=Limits()))


def test_the_demo_and_the_api_build_the_same_config(tmp_path: Path) -> None:
    demo = DemoConfig(peers=3, epochs=2, dataset="digits", data_dir="/data", device="cpu")
    launcher = Launcher(tmp_path)
    launcher.rendezvous_port = 4321
    for num in range(demo.peers):
        argv = launcher.peer_args(num, demo.peers, demo.epochs,
                                  *peer_extra_args(demo, num, launcher, 2), threads=2)
        from_cli = _parse(argv)
        api = PeerConfig(num=num, total=3, rendezvous="127.0.0.1:4321", epochs=2, job="demo",
                         dataset="digits", data_dir="/data", device="cpu", threads=2,
                         progress=False, listen="127.0.0.1:0",
                         key_file=str(tmp_path / f"peer-{num}.pem"),
                         checkpoint_file=str(tmp_path / f"peer-{num}.ckpt"),
                         events_file=str(launcher.events_path(num)))
        assert from_cli == api == peer_config(demo, num, launcher, 2)


@pytest.mark.parametrize("code", [
    "import learner.config, learner.options, peerlearn.demo",  # the peer's and demo's options
    "from peerlearn.cli import build_parser; build_parser()",  # the whole CLI
])
def test_the_cli_parser_needs_neither_torch_nor_numpy(code: str) -> None:
    """`peerlearn rendezvous` runs on the base install (no torch, no numpy): building the
    parser, peer options included, must not import them."""
    check = (f"import sys; {code}; heavy = {{'torch', 'numpy'}} & set(sys.modules); "
             "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", check], check=True, timeout=60)
