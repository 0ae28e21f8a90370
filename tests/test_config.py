"""delt.config: dataclass fields → CLI flags, identity and differences."""

import argparse
from dataclasses import dataclass, fields
from typing import Literal

import pytest
from delt.config import (
    ConfigError,
    add_arguments,
    config_diff,
    flag,
    from_namespace,
    identity_dict,
    option,
    refuse_method_options,
)


@dataclass
class Example:
    out: str = option(help="where", identity=False)
    batch_size: int = option(100, help="size")
    mode: Literal["a", "b"] = option("a", help="mode")
    limit: float | None = option(None, help="limit")
    fast: bool = option(False, help="fast")
    method: str = option("x", help="method", choices=("x", "y"))


def test_flags_are_generated_from_fields():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Example)
    args = parser.parse_args(["--out", "o", "--batch-size", "5", "--mode", "b", "--fast"])
    config = from_namespace(Example, args)
    assert config == Example(out="o", batch_size=5, mode="b", limit=None, fast=True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "o", "--method", "z"])
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --out is required
    assert flag("round_iterations") == "--round-iterations"


def test_identity_and_diff():
    first = identity_dict(Example(out="a"))
    assert "out" not in first
    second = identity_dict(Example(out="b", batch_size=7))
    assert config_diff(first, first) == []
    assert config_diff(first, second) == ["--batch-size: 100 -> 7"]


@dataclass
class WithLists:
    seeds: tuple[int, ...] = option((0,), help="seeds")
    runs: tuple[str, ...] = option(("a",), help="runs")


def test_tuple_fields_take_comma_or_space_separated_values(capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser, WithLists)
    assert from_namespace(WithLists, parser.parse_args([])) == WithLists()
    args = parser.parse_args(["--seeds", "1,2", "3", "--runs", "x", "y,z"])
    assert from_namespace(WithLists, args) == WithLists(seeds=(1, 2, 3), runs=("x", "y", "z"))
    with pytest.raises(SystemExit):
        parser.parse_args(["--seeds", "1,b"])
    assert "invalid int value: 'b'" in capsys.readouterr().err
    assert "(default: 0)" in parser.format_help()
    assert identity_dict(WithLists(seeds=(1, 2)))["seeds"] == [1, 2]  # as JSON reads it back


def test_one_methods_flags_are_refused_on_another_in_field_order():
    options = {f.name: f for f in fields(Example) if f.name in ("batch_size", "limit")}
    refuse_method_options(Example(out="o", method="x"), options, "y")  # defaults: accepted
    with pytest.raises(ConfigError, match=r"^--limit applies to --method y, not x$"):
        refuse_method_options(Example(out="o", limit=0.5), options, "y")
    with pytest.raises(ConfigError, match=r"^--batch-size applies to --method y, not x$"):
        refuse_method_options(Example(out="o", batch_size=5, limit=0.5), options, "y")
