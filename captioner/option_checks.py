"""The one way every command's configuration is checked before work starts: a rule per option,
and a one-line error naming the option as the command line spells it.

The library checks its dataclasses itself (it is also called without the CLI); click's types
catch the same values earlier on the command line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from captioner.errors import CaptionerError


@dataclass(frozen=True)
class Rule:
    holds: Callable[[Any], bool]
    expected: str  # what a valid value is, for the error


def at_least(bound: float) -> Rule:
    return Rule(lambda value: value >= bound, f"at least {bound}")


def above(bound: float) -> Rule:
    return Rule(lambda value: value > bound, f"more than {bound}")


def fraction() -> Rule:
    """0 <= value < 1."""
    return Rule(lambda value: 0 <= value < 1, "at least 0 and below 1")


def one_of(choices: Iterable[str]) -> Rule:
    choices = tuple(choices)
    return Rule(lambda value: value in choices, f"one of {', '.join(choices)}")


def optional(rule: Rule) -> Rule:
    """`rule`, or None (the option's automatic value)."""
    return Rule(lambda value: value is None or rule.holds(value), f"{rule.expected} (or unset)")


def check_options(config: object, rules: Mapping[str, Rule]) -> None:
    """CaptionerError for the first field of the dataclass `config` that its rule rejects."""
    for option in fields(config):
        rule = rules.get(option.name)
        value = getattr(config, option.name)
        if rule is not None and not rule.holds(value):
            raise CaptionerError(
                f"--{option.name.replace('_', '-')}: {value!r} is not valid; it must be"
                f" {rule.expected}"
            )
