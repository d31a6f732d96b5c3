"""What every registry of the package (model families, pruning methods, reuse methods, samplers,
data sources; issue 30) says when a member takes what another already holds: one message, naming
where both come from (a plugin file's module is named after the file: igsm.plugins.module_name)."""

from __future__ import annotations

import types


def origin(member) -> str:
    """Where a registry member comes from: its module and name (a class, a function, or the class of
    an instance)."""
    owner = member if isinstance(member, (type, types.FunctionType)) else type(member)
    return f"{owner.__module__}.{owner.__qualname__}"


def registered_twice(kind: str, name: str, what: str, first, second) -> ValueError:
    """The error of a registry where ``second`` (a member of ``kind`` named ``name``) takes ``what``
    ("the name 'unet'", "the criterion 'magnitude'") that ``first`` holds."""
    return ValueError(f"{kind} {name!r}: {what} is registered twice: by {origin(first)} and by {origin(second)}; "
                      "give one of them another")
