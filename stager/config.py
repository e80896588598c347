"""``StagerConfig``: every knob, resolved from defaults < profile < ``STAGER_*`` < keywords.

The environment is read once, in :meth:`StagerConfig.resolve`; the resolved config is frozen and
records where each value came from (``config.sources``), which ``python -m stager doctor`` prints.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import sys
import threading
import warnings
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Mapping

from stager.envs import KNOBS, KNOBS_BY_FIELD, OTHER_VARIABLES, CachePolicy, LeasePolicy, Mode
from stager.errors import StagerConfigError, StagerConfigWarning
from stager.nvtx import CheckpointSet

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["StagerConfig", "available_profiles", "load_profile", "unknown_variables"]


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """``(name, closest known name or None)`` for every set ``STAGER_*`` variable nothing reads."""
    env = os.environ if environ is None else environ
    known = [k.env for k in KNOBS] + sorted(OTHER_VARIABLES)
    out = []
    for name in sorted(n for n in env if n.startswith("STAGER_")):
        if name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        out.append((name, close[0] if close else None))
    return out


def describe_unknown(name: str, closest: str | None) -> str:
    """One line about an unknown ``STAGER_*`` variable: it is ignored, and what was probably meant."""
    hint = f"did you mean {closest}?" if closest else "no stager variable is spelled like it"
    return (
        f"{name} is set but is not a stager variable, so it is ignored; {hint} "
        "(python -m stager doctor lists every variable)"
    )


_warned_lock = threading.Lock()
_warned: set[str] = set()
"""Unknown variable names already warned about in this process."""


def _warn_unknown(environ: Mapping[str, str]) -> None:
    for name, closest in unknown_variables(environ):
        with _warned_lock:
            if name in _warned:
                continue
            _warned.add(name)
        warnings.warn(describe_unknown(name, closest), StagerConfigWarning, stacklevel=3)


def available_profiles() -> list[str]:
    """Names of the shipped profiles: the ``*.toml`` files of ``profiles/`` (package ``stager.profiles``)."""
    root = resources.files("stager.profiles")
    return sorted(p.name[: -len(".toml")] for p in root.iterdir() if p.name.endswith(".toml"))


def load_profile(name: str) -> dict[str, Any]:
    """Read one profile's key/value table; unknown names and keys raise ``StagerConfigError``."""
    names = available_profiles()
    if name not in names:
        raise StagerConfigError(
            f"unknown profile {name!r} (from STAGER_PROFILE or profile=); valid profiles: {', '.join(names)}"
        )
    text = resources.files("stager.profiles").joinpath(f"{name}.toml").read_text(encoding="utf-8")
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # pragma: no cover - shipped files are tested
        raise StagerConfigError(f"profile {name!r} is not valid TOML: {exc}") from None
    table.pop("description", None)
    bad = sorted(k for k in table if k not in KNOBS_BY_FIELD or k == "profile")
    if bad:
        valid = ", ".join(k.field for k in KNOBS if k.field != "profile")
        raise StagerConfigError(f"profile {name!r} has unknown keys {bad}; valid keys: {valid}")
    return table


def _knob(name: str) -> Any:
    """The dataclass field of the knob ``name``: default, variable and doc from ``KNOBS``."""
    knob = KNOBS_BY_FIELD[name]
    return field(default=knob.default, metadata={"env": knob.env, "doc": knob.doc})


@dataclass(frozen=True, kw_only=True)
class StagerConfig:
    """Every tunable of the stager. Build it with :meth:`resolve`, not by hand.

    Each field but ``sources`` is one knob of :data:`stager.envs.KNOBS`, which declares its
    ``STAGER_*`` variable, default, accepted form and doc (the field's metadata carries the
    variable and the doc; the list below and the README table show them).
    """

    profile: str = _knob("profile")
    async_staging: bool = _knob("async_staging")
    pinned: Mode = _knob("pinned")
    shared_memory: bool = _knob("shared_memory")
    cache_policy: CachePolicy = _knob("cache_policy")
    lease_policy: LeasePolicy = _knob("lease_policy")
    lease_timeout: float = _knob("lease_timeout")
    max_arenas: int = _knob("max_arenas")
    max_plans: int = _knob("max_plans")
    alignment: int = _knob("alignment")
    pack_threshold: int = _knob("pack_threshold")
    chunk_size: int = _knob("chunk_size")
    replay_pieces: int = _knob("replay_pieces")
    graphs: Mode = _knob("graphs")
    triton: Mode = _knob("triton")
    checksum: Mode = _knob("checksum")
    nvtx: bool = _knob("nvtx")
    profile_checkpoints: CheckpointSet = _knob("profile_checkpoints")
    host_reserve: int = _knob("host_reserve")
    device_reserve: int = _knob("device_reserve")
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    """Where each value came from: ``default``, ``profile <name>``, ``env STAGER_X`` or ``argument``."""

    @classmethod
    def resolve(cls, *, environ: Mapping[str, str] | None = None, **overrides: Any) -> "StagerConfig":
        """Resolve a config: defaults < profile < ``STAGER_*`` variables < ``overrides``.

        ``environ`` defaults to ``os.environ`` (read here, once). An unknown keyword, an unknown
        profile or a bad value raises :class:`~stager.errors.StagerConfigError`. A ``STAGER_*``
        variable that nothing reads (a misspelling) is warned about once per process and name
        (:class:`~stager.errors.StagerConfigWarning`, naming the closest real variable). With
        shared memory on, resolving on the main thread also installs the SIGTERM clean-up of
        ``/dev/shm`` arena files (:func:`stager.shm.install_sigterm_cleanup`).
        """
        env = os.environ if environ is None else environ
        _warn_unknown(env)
        unknown = sorted(k for k in overrides if k not in KNOBS_BY_FIELD)
        if unknown:
            raise StagerConfigError(
                f"unknown StagerConfig option(s) {unknown}; valid options: "
                + ", ".join(k.field for k in KNOBS)
            )
        values: dict[str, Any] = {k.field: k.default for k in KNOBS}
        sources: dict[str, str] = {k.field: "default" for k in KNOBS}

        knob = KNOBS_BY_FIELD["profile"]
        if "profile" in overrides:
            profile = knob.convert(overrides["profile"], "keyword profile")
            sources["profile"] = "argument"
        elif knob.env in env:
            profile = knob.convert(env[knob.env], knob.env)
            sources["profile"] = f"env {knob.env}"
        else:
            profile = knob.default
        values["profile"] = profile
        for name, raw in load_profile(profile).items():
            values[name] = KNOBS_BY_FIELD[name].convert(raw, f"profile {profile!r} key {name}")
            sources[name] = f"profile {profile}"

        for knob in KNOBS:
            if knob.field == "profile":
                continue
            if knob.env in env:
                values[knob.field] = knob.convert(env[knob.env], knob.env)
                sources[knob.field] = f"env {knob.env}"
            if knob.field in overrides:
                values[knob.field] = knob.convert(overrides[knob.field], f"keyword {knob.field}")
                sources[knob.field] = "argument"
        return cls(**values, sources=sources)

    def replace(self, **overrides: Any) -> "StagerConfig":
        """A copy with some values changed (validated as keywords)."""
        unknown = sorted(k for k in overrides if k not in KNOBS_BY_FIELD or k == "profile")
        if unknown:
            raise StagerConfigError(f"cannot replace {unknown}; valid options: "
                                    + ", ".join(k.field for k in KNOBS if k.field != "profile"))
        converted = {k: KNOBS_BY_FIELD[k].convert(v, f"keyword {k}") for k, v in overrides.items()}
        sources = dict(self.sources)
        sources.update({k: "argument" for k in converted})
        return dataclasses.replace(self, **converted, sources=sources)

    def describe(self) -> list[tuple[str, str, str]]:
        """``(variable, value, source)`` rows for every knob."""
        rows = []
        for knob in KNOBS:
            value = getattr(self, knob.field)
            shown = value.value if isinstance(value, enum.Enum) else value
            if isinstance(shown, bool):
                shown = int(shown)
            rows.append((knob.env, str(shown), self.sources.get(knob.field, "default")))
        return rows


StagerConfig.__doc__ = (StagerConfig.__doc__ or "") + "\n    Fields:\n\n" + "\n".join(
    f"    ``{k.field}`` (``{k.env}``): {k.doc}" for k in KNOBS
)
