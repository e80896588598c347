"""``stager.stats``: the mode enums are their strings everywhere a record's fields are used."""

from __future__ import annotations

import json

import pytest

from stager.stats import ArenaSource, DevicePath, Executor, StageStats


@pytest.mark.parametrize(
    ("enum_cls", "values"),
    [
        pytest.param(
            Executor, {"cpu", "eager", "graph-capture", "graph-replay", "restore-cpu", "restore-unpack"},
            id="executor",
        ),
        pytest.param(DevicePath, {"cpu", "packed", "direct", "unpack"}, id="device-path"),
        pytest.param(ArenaSource, {"", "cached", "cached after wait", "new-cached", "fresh"}, id="arena"),
    ],
)
def test_every_recorded_string_is_a_member(enum_cls: type, values: set[str]) -> None:
    assert {m.value for m in enum_cls} == values
    for text in values:
        member = enum_cls(text)
        assert member == text and hash(member) == hash(text) and f"{member}" == text == str(member)
        assert {text: 1}[member] == 1 and {member: 1}[text] == 1


def test_defaults_are_members_and_serialise_as_strings() -> None:
    stats = StageStats()
    assert stats.executor is Executor.CPU and stats.device_path is DevicePath.CPU
    assert stats.arena is ArenaSource.NONE
    row = json.loads(json.dumps(stats.to_dict()))
    assert (row["executor"], row["device_path"], row["arena"]) == ("cpu", "cpu", "")
