"""Run identities: what made an output, computed by one function and checked by one function.

An identity is a JSON dict: the resolved config's identity fields (``option(identity=True)``),
the SHA-256 of the input files and a format version (:func:`run_identity`). One rule keeps older
runs resumable: **a field at its default value is not part of the identity**; a field an older
identity lacks is at its default, and an input it lacks was recorded since
(:func:`identity_differences`). So a new flag never needs a shim: runs made before it existed are
runs at its default.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from delt.config import ConfigError, flag
from delt.distributed import is_main, main_first
from delt.io import read_json, write_json

__all__ = [
    "IDENTITY_FORMAT",
    "check_or_reuse",
    "config_defaults",
    "config_identity",
    "identity_defaults",
    "identity_differences",
    "run_identity",
]

IDENTITY_FORMAT = 1
_UNSET = "<unset>"


def _json(value: object) -> Any:
    """The JSON form of a value (tuples become lists), so that a fresh identity compares equal
    to one read back from a file."""
    return json.loads(json.dumps(value))


def config_defaults(config: object) -> dict[str, Any]:
    """The defaults of a config dataclass's identity fields, in JSON form (required fields
    have none)."""
    return {
        field.name: _json(field.default)
        for field in dataclasses.fields(config)  # type: ignore[arg-type]
        if field.metadata.get("identity", True) and field.default is not dataclasses.MISSING
    }


def config_identity(config: object) -> dict[str, Any]:
    """The identity fields of a config dataclass whose value is not the default, JSON form."""
    defaults = config_defaults(config)
    return {
        field.name: value
        for field in dataclasses.fields(config)  # type: ignore[arg-type]
        if field.metadata.get("identity", True)
        for value in [_json(getattr(config, field.name))]
        if field.name not in defaults or value != defaults[field.name]
    }


def run_identity(config: object, **inputs: object) -> dict[str, Any]:
    """The identity of a run: ``{"format", "config", **inputs}`` (inputs: the input files'
    SHA-256 and whatever else made the output), JSON form. The one identity function of
    ``delt recover`` (every method, PDD's stages), ``delt distill``'s steps and ``delt eval``."""
    return _json({"format": IDENTITY_FORMAT, "config": config_identity(config), **inputs})


def identity_differences(
    saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any]
) -> list[str]:
    """What differs between two identities, ``--flag: saved -> current`` for config fields (a
    missing field is at its ``defaults`` value; ``defaults`` nests like the identities, e.g.
    ``{"config": config_defaults(config)}``), ``key: saved -> current`` for the rest."""
    differences = []
    for key in dict.fromkeys([*saved, *current]):
        default = IDENTITY_FORMAT if key == "format" else defaults.get(key, _UNSET)
        if isinstance(default, dict):
            differences += identity_differences(
                saved.get(key) or {}, current.get(key) or {}, default
            )
            continue
        if default is _UNSET and key not in saved:
            continue  # an input recorded since that run: its other inputs pin it
        before, after = saved.get(key, default), current.get(key, default)
        if before != after:
            differences.append(_difference(key, before, after, key in defaults))
    return differences


def _difference(key: str, saved: object, current: object, is_field: bool) -> str:
    """How one entry differs: a config field by its flag, an input file by its SHA-256 (another
    file, or the file changed), the data by its identity."""
    if is_field:
        return f"{flag(key)}: {_short(saved)} -> {_short(current)}"
    if key.endswith("_sha256"):
        name = key.removesuffix("_sha256")
        flag_name = f"--{name}" if name in ("teacher", "selection", "distilled", "stats") else name

        def shown(value: object) -> str:
            return "none" if value is None else str(value)[:16] + "..."

        return (
            f"{flag_name}: the {name}'s SHA-256 differs (the first run's {shown(saved)}, now "
            f"{shown(current)}): another {name} file, or that file changed since the first run"
        )
    if key == "data":
        return f"the data differs ({_short(saved)} -> {_short(current)})"
    if key == "data_fingerprints" and isinstance(saved, dict) and isinstance(current, dict):
        splits = [split for split in {**saved, **current} if saved.get(split) != current.get(split)]
        return "; ".join(f"{split} split: other data" for split in splits)
    return f"{key}: {_short(saved)} -> {_short(current)}"


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def identity_defaults(config: object) -> dict[str, Any]:
    """The ``defaults`` of a :func:`run_identity` of ``config``."""
    return {"config": config_defaults(config)}


def check_or_reuse(
    path: Path,
    identity: dict[str, Any],
    defaults: dict[str, Any],
    refuse: str | None = None,
    key: str | None = None,
) -> bool:
    """The one identity check: does the JSON file ``path`` (its ``key`` entry, if given) record
    ``identity``? The first run writes it (rank 0, with ``refuse``; torchrun's other ranks then
    read it).

    Returns:
        True: it records this identity (reuse or resume); False: no file, or (without
        ``refuse``) another identity (compute again).

    Raises:
        ConfigError: with ``refuse``, another identity: ``refuse`` with ``{differences}``
            replaced by what differs.
    """
    if refuse is not None and key is None:
        with main_first():
            if is_main() and not path.is_file():
                write_json(path, identity)
                return True
    if not path.is_file():
        return False
    saved = read_json(path)
    if key is not None:
        saved = saved.get(key)
        if saved is None:  # recorded before identities existed: its run's identity matched
            return True
    differences = identity_differences(saved, identity, defaults)
    if differences and refuse is not None:
        raise ConfigError(refuse.replace("{differences}", "; ".join(differences)))
    return not differences
