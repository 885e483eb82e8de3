"""Typed ``--opt key=value`` options: the one mechanism every owner of option keys uses (the importance method,
the allocator, the self-pruner's proposal backend, the repair stage, streaming).

An owner declares a frozen dataclass of :func:`option` fields (:class:`TypedOptions`); :meth:`TypedOptions.parse`
converts and range-checks its own keys; :func:`check_options` refuses, before any work, a key that no owner of
the chosen configuration claims (one line: the key, the closest accepted key, the accepted keys per owner).
A leaf module (no project imports but the error type), so owners anywhere can import it.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar

from .errors import EdgepruneError


def option(default, choices: tuple | None = None, lo: float | None = None, hi: float | None = None, doc: str = ""):
    """A typed ``--opt`` option: its default (whose type is the option's type; ``""`` for an optional string),
    the allowed values (``choices``) or bounds (``lo`` <= v <= ``hi``), and a one-line description."""
    return field(default=default, metadata={"choices": choices, "lo": lo, "hi": hi, "doc": doc})


@dataclass(frozen=True)
class TypedOptions:
    """Base of one owner's typed ``--opt`` options; subclasses add :func:`option` fields and may check relations
    between fields in ``__post_init__`` (raising :class:`EdgepruneError`). ``OWNER`` names the owner in messages."""

    OWNER: ClassVar[str] = "this option's owner"

    @classmethod
    def parse(cls, raw: dict, owner: str | None = None) -> "TypedOptions":
        """The options of ``raw`` that belong to this class, converted and checked; other keys are left to their
        owners (:func:`check_options` refuses the keys nobody claims)."""
        vals = {f.name: _convert(f, raw[f.name], owner or cls.OWNER) for f in fields(cls) if f.name in raw}
        return cls(**vals)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def describe(cls) -> dict[str, str]:
        """``name -> allowed values`` (for help texts and errors)."""
        return {f.name: _allowed(f) for f in fields(cls)}


def _allowed(f) -> str:
    m, typ = f.metadata, type(f.default if f.default is not MISSING else "")
    if m.get("choices"):
        return "one of " + ", ".join(str(c) for c in m["choices"])
    kind = {bool: "true or false", int: "an integer", float: "a number"}.get(typ, "a string")
    if m.get("lo") is not None and m.get("hi") is not None:
        return f"{kind} in [{m['lo']}, {m['hi']}]"
    if m.get("lo") is not None:
        return f"{kind} >= {m['lo']}"
    return kind


def _convert(f, v, owner: str):
    typ, m = type(f.default), f.metadata
    bad = EdgepruneError(f"--opt {f.name}={v}: {owner}'s {f.name} must be {_allowed(f)}")
    if typ is bool:
        if isinstance(v, bool):
            out = v
        elif str(v).lower() in ("true", "1", "yes"):
            out = True
        elif str(v).lower() in ("false", "0", "no"):
            out = False
        else:
            raise bad
    elif typ in (int, float):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (typ is int and float(v) != int(v)):
            raise bad
        out = typ(v)
        if not math.isfinite(out) or (m.get("lo") is not None and out < m["lo"]) or \
                (m.get("hi") is not None and out > m["hi"]):
            raise bad
    else:
        out = v if isinstance(v, str) else str(v)
    if m.get("choices") and out not in m["choices"]:
        raise bad
    return out


def check_options(raw: dict, owners: list[tuple[str, type[TypedOptions]]], combo: str,
                  elsewhere: dict[str, str] | None = None) -> None:
    """Check the ``--opt`` dict ``raw`` against the ``(label, options class)`` owners of one configuration (named
    by ``combo``, e.g. ``--method flap --allocation global``): a key that no owner claims is refused with the closest
    accepted key and the accepted keys per owner (``elsewhere``: key -> the flag that would claim it, for a key
    that belongs to an owner this configuration does not use); every owner's values are converted and checked."""
    claimed = [k for _, cls in owners for k in cls.keys()]
    other = elsewhere or {}
    for k in raw:
        if k not in claimed:
            raise EdgepruneError(f"--opt {k}={raw[k]}: unknown option for {combo} ({_hint(k, claimed, other)}); accepted keys: "
                                 + "; ".join(f"{label}: {', '.join(c.keys())}" for label, c in owners if c.keys()))
    for label, cls in owners:
        cls.parse(raw, label)


def _hint(k: str, claimed: list[str], other: dict[str, str]) -> str:
    """Why ``k`` is refused: the closest accepted key, else the owner elsewhere that has it (or a close key)."""
    if k in other:
        return f"it is an option of {other[k]}, which this configuration does not use"
    close = difflib.get_close_matches(k, claimed, n=1)
    if close:
        return f"did you mean {close[0]}?"
    close = difflib.get_close_matches(k, list(other), n=1)
    if close:
        return f"did you mean {close[0]}? that is an option of {other[close[0]]}, which this configuration does not use"
    return "no such option"
