"""What several commands' options share: a choice read from the recipe schema, and an option's old
spelling kept as a hidden alias (CONTRIBUTING.md). Not a subcommand (the leading underscore keeps it
out of the CLI's list)."""

from __future__ import annotations

from typing import TypeVar

from slsd_cli.errors import InputError

T = TypeVar("T")


def check_choice(option: str, value: str | None, key: str) -> None:
    """A flag that sets the Literal recipe key `key` (None: not given) is one of the schema's choices."""
    from slsd_cli.recipe import field_choices

    choices = field_choices(key)
    if value is not None and value not in choices:
        raise InputError(f"{option} must be one of {', '.join(choices)}, got {value!r}")


def renamed(value: T | None, old_value: T | None, option: str, old_option: str) -> T | None:
    """The value of `option`, given under its name or under its old spelling `old_option` (a hidden
    alias); the two with different values are refused. None: neither was given."""
    if value is not None and old_value is not None and value != old_value:
        raise InputError(f"{option} and {old_option} (its old spelling) disagree; give one")
    return value if value is not None else old_value
