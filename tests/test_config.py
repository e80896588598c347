"""StagerConfig: precedence, every bad value, profiles, and the README's variable table."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from stager.config import StagerConfig, available_profiles, load_profile
from stager.envs import KNOBS, CachePolicy, LeasePolicy, Mode, parse_size
from stager.errors import StagerConfigError

README = Path(__file__).resolve().parents[1] / "README.md"

# The public set of variables. Adding or removing one is a deliberate change: update this list,
# the README table and the docs together.
EXPECTED_VARIABLES = {
    "STAGER_PROFILE", "STAGER_ASYNC", "STAGER_PINNED", "STAGER_SHARED_MEMORY", "STAGER_CACHE_POLICY",
    "STAGER_LEASE_POLICY", "STAGER_LEASE_TIMEOUT", "STAGER_MAX_ARENAS", "STAGER_MAX_PLANS",
    "STAGER_ALIGNMENT", "STAGER_PACK_THRESHOLD", "STAGER_CHUNK_SIZE", "STAGER_REPLAY_PIECES", "STAGER_GRAPHS",
    "STAGER_TRITON", "STAGER_NVTX", "STAGER_HOST_RESERVE", "STAGER_DEVICE_RESERVE",
    "STAGER_PROFILE_CHECKPOINTS", "STAGER_CHECKSUM",
}


def test_the_set_of_variables_is_pinned() -> None:
    assert {k.env for k in KNOBS} == EXPECTED_VARIABLES
    assert all(k.env == "STAGER_" + k.field.upper() or k.field == "async_staging" for k in KNOBS)


def test_readme_table_lists_every_variable_with_its_default() -> None:
    rows = re.findall(r"^\| `(STAGER_[A-Z_]+)` \| `([^`]*)` \|", README.read_text(), re.M)
    assert {name for name, _ in rows} == EXPECTED_VARIABLES
    defaults = StagerConfig.resolve(environ={})
    for name, shown in rows:
        knob = next(k for k in KNOBS if k.env == name)
        assert knob.convert(shown, name) == getattr(defaults, knob.field), name


def test_the_config_fields_are_the_knobs_with_their_defaults_and_docs() -> None:
    fields = [f for f in dataclasses.fields(StagerConfig) if f.name != "sources"]
    assert [f.name for f in fields] == [k.field for k in KNOBS]
    for f, knob in zip(fields, KNOBS):
        assert (f.default, f.metadata["env"], f.metadata["doc"]) == (knob.default, knob.env, knob.doc)
        assert f"``{knob.field}`` (``{knob.env}``): {knob.doc}" in (StagerConfig.__doc__ or "")
    assert StagerConfig() == StagerConfig.resolve(environ={})


def test_defaults() -> None:
    cfg = StagerConfig.resolve(environ={})
    assert cfg.profile == "default" and cfg.async_staging is False and cfg.pinned is Mode.AUTO
    assert cfg.cache_policy is CachePolicy.AUTO and cfg.lease_policy is LeasePolicy.ALLOCATE
    assert cfg.chunk_size == 64 << 20 and set(cfg.sources.values()) == {"default"}


def test_precedence_default_profile_env_argument() -> None:
    cfg = StagerConfig.resolve(environ={"STAGER_PROFILE": "low_memory"})
    assert cfg.chunk_size == 16 << 20 and cfg.sources["chunk_size"] == "profile low_memory"
    cfg = StagerConfig.resolve(environ={"STAGER_PROFILE": "low_memory", "STAGER_CHUNK_SIZE": "8MiB"})
    assert cfg.chunk_size == 8 << 20 and cfg.sources["chunk_size"] == "env STAGER_CHUNK_SIZE"
    cfg = StagerConfig.resolve(environ={"STAGER_PROFILE": "low_memory", "STAGER_CHUNK_SIZE": "8MiB"},
                               chunk_size="2MiB")
    assert cfg.chunk_size == 2 << 20 and cfg.sources["chunk_size"] == "argument"
    cfg = StagerConfig.resolve(environ={"STAGER_PROFILE": "low_memory"}, profile="throughput")
    assert cfg.profile == "throughput" and cfg.async_staging is True


def test_environment_is_read_from_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAGER_MAX_ARENAS", "3")
    assert StagerConfig.resolve().max_arenas == 3


@pytest.mark.parametrize(
    "text, expected",
    [
        ("512", 512), ("64KiB", 64 << 10), ("64MiB", 64 << 20), ("1.5GiB", 3 << 29), ("2G", 2 << 30),
        ("8 MB", 8 << 20),
    ],
)
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


BAD_VALUES = {
    "STAGER_PROFILE": "nope",
    "STAGER_ASYNC": "true",
    "STAGER_PINNED": "yes",
    "STAGER_SHARED_MEMORY": "2",
    "STAGER_CACHE_POLICY": "sometimes",
    "STAGER_LEASE_POLICY": "block",
    "STAGER_LEASE_TIMEOUT": "-1",
    "STAGER_MAX_ARENAS": "0",
    "STAGER_MAX_PLANS": "0",
    "STAGER_ALIGNMENT": "48",
    "STAGER_PACK_THRESHOLD": "big",
    "STAGER_CHUNK_SIZE": "0",
    "STAGER_REPLAY_PIECES": "1.5",
    "STAGER_GRAPHS": "maybe",
    "STAGER_TRITON": "enabled",
    "STAGER_CHECKSUM": "yes",
    "STAGER_NVTX": "on",
    "STAGER_PROFILE_CHECKPOINTS": "3-2",
    "STAGER_HOST_RESERVE": "-3",
    "STAGER_DEVICE_RESERVE": "lots",
}


def test_every_variable_has_a_bad_value_case() -> None:
    assert set(BAD_VALUES) == EXPECTED_VARIABLES


@pytest.mark.parametrize("name, value", sorted(BAD_VALUES.items()))
def test_bad_environment_value_names_variable_value_and_form(name: str, value: str) -> None:
    with pytest.raises(StagerConfigError) as info:
        StagerConfig.resolve(environ={name: value})
    msg = str(info.value)
    assert name in msg and repr(value) in msg or name == "STAGER_PROFILE" and "nope" in msg
    knob = next(k for k in KNOBS if k.env == name)
    if name != "STAGER_PROFILE":
        assert knob.form in msg


def test_bad_keyword_and_unknown_keyword() -> None:
    with pytest.raises(StagerConfigError, match="chunk_size="):
        StagerConfig.resolve(environ={}, chunk_size="huge")
    with pytest.raises(StagerConfigError, match="valid options"):
        StagerConfig.resolve(environ={}, chunk_bytes=1)
    with pytest.raises(StagerConfigError, match="max_arenas"):
        StagerConfig.resolve(environ={}, max_arenas=True)


def test_unknown_profile_lists_the_valid_ones() -> None:
    with pytest.raises(StagerConfigError, match="default, low_memory, throughput"):
        StagerConfig.resolve(environ={"STAGER_PROFILE": "fast"})


def test_shipped_profiles_are_valid_and_unknown_keys_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"default", "low_memory", "throughput"} <= set(available_profiles())
    for name in available_profiles():
        StagerConfig.resolve(environ={}, profile=name)

    import stager.config as config_mod

    monkeypatch.setattr(config_mod.tomllib, "loads", lambda text: {"chunk_sz": 1})
    with pytest.raises(StagerConfigError, match="unknown keys \\['chunk_sz'\\]; valid keys"):
        load_profile("default")


def test_replace_and_describe() -> None:
    cfg = StagerConfig.resolve(environ={}).replace(nvtx=True, graphs="off")
    assert cfg.nvtx is True and cfg.graphs is Mode.OFF and cfg.sources["nvtx"] == "argument"
    rows = {name: (value, source) for name, value, source in cfg.describe()}
    assert rows["STAGER_NVTX"] == ("1", "argument") and rows["STAGER_GRAPHS"] == ("off", "argument")


def test_the_throughput_profile_keeps_staging_while_both_persistent_arenas_are_held() -> None:
    from stager import GraphStager

    sd = {"w": torch.ones(4)}
    with GraphStager(profile="throughput", async_staging=False) as stager:
        held = [stager.stage(sd) for _ in range(3)]
        assert [len(stager._sets), stager.last_stats.arena] == [2, "fresh"]
        assert all(torch.equal(h["w"], sd["w"]) for h in held)
