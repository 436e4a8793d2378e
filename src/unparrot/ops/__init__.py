"""Per-sample operators, by name. A plain dict: name -> "module:Class" (imported on first use, so a
light stage never pays for torch). Any "package.module:Class" string works too, for user plug-ins."""

from __future__ import annotations

import importlib

OPS: dict[str, str] = {
    "inspect": "unparrot.ops.inspect:Inspect",
    "spot": "unparrot.ops.spot:Spot",
    "parrot": "unparrot.ops.parrot:Parrot",
    "embed": "unparrot.ops.embed:Embed",
    "aesthetic": "unparrot.ops.aesthetic:Aesthetic",
    "deparrot": "unparrot.ops.deparrot:Deparrot",
}


def get_op(name: str):
    """Resolve an operator class from a registry name or a "module:Class" path."""
    target = OPS.get(name, name)
    if ":" not in target:
        raise KeyError(f"unknown operator {name!r}; known: {', '.join(sorted(OPS))} (or 'module:Class')")
    mod, _, cls = target.partition(":")
    return getattr(importlib.import_module(mod), cls)
