"""A misspelled ``STAGER_*`` variable is not silently ignored: one warning per process and name,
naming the closest real variable; variables the project reads are never warned about."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from stager import GraphStager, StagerConfig
from stager import config as config_mod
from stager.envs import KNOBS, OTHER_VARIABLES
from stager.errors import StagerConfigWarning

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDERS = {"STAGER_X"}  # "env STAGER_X" in docstrings stands for any knob


@pytest.fixture(autouse=True)
def _fresh_warned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_mod, "_warned", set())


def _config_warnings(environ: dict[str, str]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        StagerConfig.resolve(environ=environ)
    return [str(w.message) for w in caught if issubclass(w.category, StagerConfigWarning)]


def test_a_misspelled_variable_is_warned_about_naming_the_closest_one() -> None:
    with pytest.warns(StagerConfigWarning) as record:
        cfg = StagerConfig.resolve(environ={"STAGER_CHUNKSIZE": "8MiB"})
    assert cfg.chunk_size == 64 << 20  # still ignored, but no longer silently
    (msg,) = [str(w.message) for w in record]
    assert "STAGER_CHUNKSIZE is set but is not a stager variable" in msg
    assert "did you mean STAGER_CHUNK_SIZE?" in msg


def test_each_name_is_warned_about_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"STAGER_PINED": "on", "STAGER_LEASE_TIMOUT": "3"}
    first = _config_warnings(env)
    assert len(first) == 2
    assert any("did you mean STAGER_PINNED?" in m for m in first)
    assert any("did you mean STAGER_LEASE_TIMEOUT?" in m for m in first)
    assert _config_warnings(env) == []
    monkeypatch.setenv("STAGER_PINED", "on")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        GraphStager().close()
    assert not [w for w in caught if issubclass(w.category, StagerConfigWarning)]


def test_the_process_environment_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAGER_MAX_ARENA", "3")
    with pytest.warns(StagerConfigWarning, match="STAGER_MAX_ARENA .*did you mean STAGER_MAX_ARENAS"):
        GraphStager().close()


def test_a_name_like_no_variable_still_says_it_is_ignored() -> None:
    (msg,) = _config_warnings({"STAGER_ZZZZZZZZZZZZZZ": "1"})
    assert "STAGER_ZZZZZZZZZZZZZZ is set but is not a stager variable, so it is ignored" in msg


def test_real_variables_are_never_warned_about() -> None:
    env = {name: value for name, value, _ in StagerConfig.resolve(environ={}).describe()}
    assert set(env) == {k.env for k in KNOBS}
    env |= {name: "x" for name in OTHER_VARIABLES}
    assert _config_warnings(env) == []


def test_every_variable_named_in_the_sources_is_a_knob_or_declared() -> None:
    known = {k.env for k in KNOBS} | OTHER_VARIABLES | PLACEHOLDERS
    found: dict[str, str] = {}
    for folder in ("stager", "kernels", "graphs"):
        for path in (ROOT / folder).rglob("*.py"):
            for name in re.findall(r"STAGER_[A-Z0-9_]*[A-Z0-9]", path.read_text(encoding="utf-8")):
                found.setdefault(name, str(path.relative_to(ROOT)))
    unread = {name: where for name, where in found.items() if name not in known}
    assert not unread, f"add these to stager.envs.OTHER_VARIABLES (or KNOBS): {unread}"
