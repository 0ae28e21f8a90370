"""Command configurations: dataclasses whose fields map one-to-one onto CLI flags.

A field ``batch_size`` is the flag ``--batch-size`` (:func:`flag`); its help, choices and identity
live in the field's metadata (:func:`option`), so the parser is generated from the dataclass. A
``tuple[int, ...]`` field takes comma- or space-separated values (``--seeds 0,1,2``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, get_args, get_origin

__all__ = [
    "ConfigError",
    "add_arguments",
    "FLOAT32_MAX",
    "SEED_MAX",
    "check_flag_values",
    "check_float",
    "check_int",
    "check_int_fields",
    "check_seed",
    "config_diff",
    "flag",
    "from_namespace",
    "option",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag and what was expected."""


def flag(field_name: str) -> str:
    """The CLI flag of a config field: ``batch_size`` → ``--batch-size``."""
    return "--" + field_name.replace("_", "-")


def check_int(label: str, value: object, low: int = 1) -> None:
    """The one integer check: ``value`` must be an ``int`` (not a bool) ``>= low``.

    Raises:
        ConfigError: ``"<label> must be an integer >= <low>, got <value>"``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{label} must be an integer >= {low}, got {value!r}")


# The largest finite float32: every float flag ends up in float32 arithmetic (a loss weight, a
# learning rate of an Adam over float32 tensors), where a larger value is infinite.
FLOAT32_MAX = 3.4028234663852886e38
# torch.Generator.manual_seed takes an unsigned 64-bit seed; numpy's SeedSequence (derived
# seeds) a non-negative one.
SEED_MAX = 2**64 - 1


def check_float(label: str, value: object) -> None:
    """A float flag's value must be a finite number within float32's range (``|value| <=``
    :data:`FLOAT32_MAX`): NaN, infinity or an overflowing ``1e39`` would turn every loss or
    step it scales into NaN.

    Raises:
        ConfigError: ``"<label> must be a finite number within float32's range ..."``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{label} must be a number, got {value!r}")
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise ConfigError(
            f"{label} must be a finite number within float32's range (|x| <= 3.4e38), got {value!r}"
        )


def check_seed(label: str, value: object) -> None:
    """A seed must be an integer in ``0 .. 2**64 - 1`` (what ``torch.Generator`` takes).

    Raises:
        ConfigError: naming ``label``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise ConfigError(f"{label} must be an integer in 0..2**64-1 (a seed), got {value!r}")


def check_flag_values(cls: type, values: dict[str, Any]) -> None:
    """The checks every command's flags get, whatever the command (:func:`from_namespace`):
    float flags finite within float32's range (:func:`check_float`), seeds (fields ``seed`` and
    ``seeds``) within a generator's range (:func:`check_seed`), and no empty value for a string
    flag whose default is not empty (``--out ""`` would silently be the current folder).

    Raises:
        ConfigError: naming the flag.
    """
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        value = values.get(field.name)
        if value is None:
            continue
        label = field.metadata.get("cli_flag") or flag(field.name)
        annotation, _ = _unwrap_optional(hints[field.name])
        if annotation is float:
            check_float(label, value)
        elif field.name in ("seed", "seeds"):
            for seed in value if isinstance(value, (tuple, list)) else (value,):
                check_seed(label, seed)
        elif annotation is str and value == "" and field.default != "":
            raise ConfigError(f"{label} is empty; expected a path or name (. for this folder)")


def check_int_fields(config: object, names: tuple[str, ...], low: int = 1) -> None:
    """:func:`check_int` on each named field of ``config`` that is not None, by its flag."""
    for name in names:
        value = getattr(config, name)
        if value is not None:
            check_int(flag(name), value, low)


def refuse_method_options(config: object, options: dict[str, Any], method: str) -> None:
    """Refuses the flags of one method on a config of another: each field named in ``options``
    (field name → its :func:`option`) must keep its default.

    Raises:
        ConfigError: ``"<flag> applies to --method <method>, not <config.method>"``, for the
            first such field in ``options`` order.
    """
    for name, field in options.items():
        if getattr(config, name) != field.default:
            raise ConfigError(
                f"{flag(name)} applies to --method {method}, not {config.method}"  # type: ignore[attr-defined]
            )


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    identity: bool = True,
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
    cli_flag: str | None = None,
    group: str | None = None,
) -> Any:
    """A config field with its CLI help.

    Args:
        default: the default; leave it out for a required flag.
        help: the flag's help text.
        identity: False for fields that do not change a command's results (progress bars,
            worker counts); :func:`config_diff` ignores them when deciding whether a saved run
            may be resumed or reused.
        choices: the accepted values of a ``str`` field whose choices live in a registry (or a
            function returning them when the parser is built: a registry that grows).
        cli_flag: the flag, where the field's name cannot be it (``--import`` is a Python
            keyword: the field ``import_arch`` is ``option(cli_flag="--import")``).
        group: the help group of the flag (a method's own flags: the method's name).
    """
    metadata = {"help": help, "identity": identity, "choices": choices, "group": group}
    if cli_flag is not None:
        metadata["cli_flag"] = cli_flag
    return dataclasses.field(default=default, metadata=metadata)


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _tuple_item_type(annotation: Any) -> type | None:
    """``int`` for ``tuple[int, ...]`` (``float``, ``str`` likewise); None for any other
    annotation."""
    if get_origin(annotation) is tuple:
        args = get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis and args[0] in (int, float, str):
            return args[0]
    return None


class _ExtendSplit(argparse.Action):
    """Collects the values of a tuple flag, each token split at commas, into a tuple."""

    def __init__(self, *args: Any, item_type: type, **kwargs: Any) -> None:
        self.item_type = item_type
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items = []
        for token in values:
            for text in filter(None, (t.strip() for t in token.split(","))):
                try:
                    items.append(self.item_type(text))
                except ValueError:
                    parser.error(
                        f"argument {option_string}: invalid {self.item_type.__name__} value: "
                        f"{text!r}"
                    )
        if not items:
            parser.error(f"argument {option_string}: expected at least one value")
        setattr(namespace, self.dest, tuple(items))


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds one flag per field of the dataclass ``cls`` to ``parser``.

    Required fields become required flags; ``bool`` fields ``--flag/--no-flag``; ``Literal``
    fields (and ``option(choices=...)``) get their choices; ``X | None`` fields default to None;
    ``tuple[int, ...]`` and ``tuple[str, ...]`` fields take comma- or space-separated values.
    """
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    # A method's own flags (option(group=...)) after the command's, each group in its own section.
    fields = dataclasses.fields(cls)
    for field in sorted(fields, key=lambda field: field.metadata.get("group") is not None):
        annotation, _ = _unwrap_optional(hints[field.name])
        kwargs: dict[str, Any] = {"help": field.metadata.get("help", ""), "dest": field.name}
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            kwargs["required"] = True
            kwargs["help"] += " (required)"
        else:
            kwargs["default"] = field.default
            if field.default is not None and annotation is not bool:
                shown = field.default
                shown = ",".join(map(str, shown)) if isinstance(shown, tuple) else shown
                kwargs["help"] += f" (default: {shown})"
        item_type = _tuple_item_type(annotation)
        if item_type is not None:
            kwargs.update(
                action=_ExtendSplit, item_type=item_type, nargs="+", metavar=field.name.upper()
            )
        elif annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(annotation) is Literal:
            choices = get_args(annotation)
            kwargs.update(choices=choices, type=type(choices[0]))
        elif annotation in (int, float, str):
            kwargs["type"] = annotation
            choices = field.metadata.get("choices")
            if choices:
                kwargs["choices"] = choices() if callable(choices) else choices
        else:
            raise TypeError(f"{cls.__name__}.{field.name}: unsupported field type {annotation}")
        group = field.metadata.get("group")
        if group is not None and group not in groups:
            groups[group] = parser.add_argument_group(f"options of --method {group}")
        target = parser if group is None else groups[group]
        target.add_argument(field.metadata.get("cli_flag") or flag(field.name), **kwargs)


def from_namespace(cls: type[T], namespace: argparse.Namespace) -> T:
    """Builds ``cls`` from the parsed flags: :func:`check_flag_values`, then its
    ``__post_init__`` validates."""
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)}
    check_flag_values(cls, values)
    return cls(**values)


def identity_dict(config: object) -> dict[str, Any]:
    """The fields of ``config`` that determine its results (``identity=True``), as a dict.

    Tuples become lists, so that a dict read back from JSON compares equal to a fresh one.
    """
    return {
        f.name: list(value) if isinstance(value, tuple) else value
        for f in dataclasses.fields(config)  # type: ignore[arg-type]
        if f.metadata.get("identity", True)
        for value in [getattr(config, f.name)]
    }


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two identity dicts (``--flag: saved → current``)."""
    keys = list(dict.fromkeys([*saved, *current]))
    return [
        f"{flag(key)}: {saved.get(key, '<unset>')!r} -> {current.get(key, '<unset>')!r}"
        for key in keys
        if saved.get(key, "<unset>") != current.get(key, "<unset>")
    ]
