"""delt.identity: one identity function, one check, and the one rule that keeps older runs
resumable (a field at its default is not part of an identity; one an older identity lacks is at
its default)."""

from __future__ import annotations

import json

import pytest
from delt.config import ConfigError, identity_dict
from delt.identity import (
    IDENTITY_FORMAT,
    check_or_reuse,
    config_identity,
    identity_defaults,
    identity_differences,
    run_identity,
)
from delt.recover import RecoverConfig


def _config(**overrides):
    return RecoverConfig(teacher="t.pt", ipc=2, out="o", method="cda", **overrides)


def test_an_identity_holds_the_fields_off_their_defaults_the_inputs_and_a_format():
    identity = run_identity(_config(lr=0.1, stage_ipc=None), teacher_sha256="ab")
    assert identity == {
        "format": IDENTITY_FORMAT,
        "config": {"ipc": 2, "method": "cda", "lr": 0.1},
        "teacher_sha256": "ab",
    }
    # Paths and other identity=False fields are never part of it.
    assert "teacher" not in config_identity(_config()) and "out" not in config_identity(_config())


def test_an_older_identity_with_every_field_written_out_is_the_same_identity():
    config = _config(iterations=6)
    older = {"config": json.loads(json.dumps(identity_dict(config))), "teacher_sha256": "ab"}
    current = run_identity(config, teacher_sha256="ab")
    assert identity_differences(older, current, identity_defaults(config)) == []
    # An input recorded since (here: the data identity) does not make it another run.
    later = {**current, "data": {"name": "x"}}
    assert identity_differences(older, later, identity_defaults(config)) == []


def test_a_field_an_older_identity_lacks_is_at_its_default():
    config = _config()
    older = {"config": {"ipc": 2, "method": "cda"}}  # made before --per-sample-aug existed
    assert not identity_differences(older, run_identity(config), identity_defaults(config))
    changed = run_identity(_config(per_sample_aug=True))
    differences = identity_differences(older, changed, identity_defaults(config))
    assert differences == ["--per-sample-aug: False -> True"]
    differences = identity_differences({"format": 2}, {}, {})
    assert differences == [f"format: 2 -> {IDENTITY_FORMAT}"]


def test_check_or_reuse_writes_the_first_identity_and_refuses_another(tmp_path):
    path = tmp_path / "run.json"
    config = _config()
    defaults = identity_defaults(config)
    refuse = "another run ({differences})"
    assert check_or_reuse(path, run_identity(config), defaults, refuse=refuse)
    assert json.loads(path.read_text()) == run_identity(config)
    assert check_or_reuse(path, run_identity(config), defaults, refuse=refuse)
    with pytest.raises(ConfigError, match=r"another run \(--lr: 0.25 -> 0.5\)"):
        check_or_reuse(path, run_identity(_config(lr=0.5)), defaults, refuse=refuse)
    # Without refuse: a cache check (False: compute again), which never writes.
    assert not check_or_reuse(path, run_identity(_config(lr=0.5)), defaults)
    assert not check_or_reuse(tmp_path / "none.json", run_identity(config), defaults)
