"""Domain types to and from their wire messages and JSON, in one place, by field name.

Every domain type is a frozen dataclass whose fields carry the names of its message's
fields, so one generic pair converts them all: a new field costs its line in the type and
its line in the .proto, nothing else (tests/test_wire.py fails when the two disagree).
Where a field cannot follow the rule (a matrix as repeated rows, say) the type declares its
own converters once, with :func:`wire_field`.

JSON (what the stores keep) goes through pydantic, which already knows dataclasses,
tuples, mappings and enums.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from pydantic import ConfigDict, TypeAdapter

from edgefleet.core.compat import StrEnum

if TYPE_CHECKING:
    from typing_extensions import Self  # typing's own from 3.11

T = TypeVar("T")
M = TypeVar("M", bound=Message)

_INT_TYPES = frozenset(
    {
        FieldDescriptor.CPPTYPE_INT32,
        FieldDescriptor.CPPTYPE_INT64,
        FieldDescriptor.CPPTYPE_UINT32,
        FieldDescriptor.CPPTYPE_UINT64,
    }
)


class WireEnum(StrEnum):
    """A domain enum that reads as its label ("ready", "queued") and travels as the number
    of its proto enum: members are declared in wire-number order, from 0."""

    @property
    def number(self) -> int:
        return list(type(self)).index(self)

    @classmethod
    def from_number(cls, number: int) -> Self:
        """The member of a wire number; one this side does not know (a newer peer's) reads
        as the first member, the protocol's unspecified value."""
        members = list(cls)
        return members[number] if 0 <= number < len(members) else members[0]


@dataclasses.dataclass(frozen=True)
class WireField:
    """How one dataclass field travels when not as-is under its own name."""

    to_wire: Callable[[Any], Any] | None = None
    from_wire: Callable[[Any], Any] | None = None


def wire_field(
    *,
    to_wire: Callable[[Any], Any] | None = None,
    from_wire: Callable[[Any], Any] | None = None,
) -> dict[str, WireField]:
    """Field metadata: `dataclasses.field(metadata=wire_field(to_wire=..., from_wire=...))`."""
    return {"wire": WireField(to_wire, from_wire)}


class WireMismatch(TypeError):
    """A domain type and its message disagree on a field: a programming error."""


def _fields(message: Any, cls: Any) -> list[tuple[dataclasses.Field[Any], Any]]:
    pairs = []
    for f in dataclasses.fields(cls):
        fd = message.fields_by_name.get(f.name)
        if fd is None:
            raise WireMismatch(
                f"{cls.__name__}.{f.name} has no field of that name in {message.full_name}; "
                "add it to the .proto (and regenerate) or rename it"
            )
        pairs.append((f, fd))
    return pairs


def _scalar(fd: Any, value: Any) -> Any:
    if isinstance(value, WireEnum):
        value = value.number
    elif isinstance(value, Enum):
        value = value.value
    elif isinstance(value, Path):
        value = str(value)
    if fd.cpp_type in _INT_TYPES and isinstance(value, float):
        return int(value)  # timestamps kept as float seconds travel as whole seconds
    return value


def _fill(message: Message, obj: Any) -> None:
    for f, fd in _fields(message.DESCRIPTOR, type(obj)):
        value = getattr(obj, f.name)
        spec: WireField | None = f.metadata.get("wire")
        if spec is not None and spec.to_wire is not None:
            value = spec.to_wire(value)
        if value is None:
            continue
        target = getattr(message, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            for key, item in value.items():
                if value_fd.message_type is None:
                    target[key] = _scalar(value_fd, item)
                elif isinstance(item, Message):
                    target[key].CopyFrom(item)
                else:
                    _fill(target[key], item)
        elif fd.is_repeated:
            if fd.message_type is not None:
                for item in value:
                    if isinstance(item, Message):
                        target.add().CopyFrom(item)
                    else:
                        _fill(target.add(), item)
            else:
                target.extend(_scalar(fd, item) for item in value)
        elif fd.message_type is not None:
            if isinstance(value, Message):
                target.CopyFrom(value)
            else:
                _fill(target, value)
            target.SetInParent()
        else:
            setattr(message, fd.name, _scalar(fd, value))


def to_proto(obj: Any, message_type: type[M]) -> M:
    """The message of type `message_type` that carries dataclass `obj`, field by field."""
    message = message_type()
    _fill(message, obj)
    return message


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional(hint: Any) -> Any | None:
    """X for `X | None`, else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0]
    return None


def _from_wire(hint: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return from_proto(value, hint)
    origin = typing.get_origin(hint)
    if origin is tuple:
        (element, *_) = typing.get_args(hint)
        return tuple(_from_wire(element, item) for item in value)
    if origin in (Mapping, dict, typing.Mapping):
        _, element = typing.get_args(hint)
        return {key: _from_wire(element, item) for key, item in value.items()}
    if isinstance(hint, type) and issubclass(hint, WireEnum):
        return hint.from_number(value)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return hint(value)
    if hint in (int, float, str, bool, bytes, Path):
        return hint(value)
    if hint is Any:
        return value
    raise WireMismatch(f"cannot read a {hint!r} from the wire; give the field a wire_field")


def from_proto(message: Message, cls: type[T]) -> T:
    """The dataclass `cls` that `message` carries (the inverse of :func:`to_proto`)."""
    hints = _hints(typing.cast(Any, cls))
    values: dict[str, Any] = {}
    for f, fd in _fields(message.DESCRIPTOR, cls):
        raw = getattr(message, fd.name)
        spec: WireField | None = f.metadata.get("wire")
        if spec is not None and spec.from_wire is not None:
            values[f.name] = spec.from_wire(raw)
            continue
        hint = hints[f.name]
        inner = _optional(hint)
        if inner is not None:
            if not fd.has_presence:
                raise WireMismatch(
                    f"{cls.__name__}.{f.name} may be None but {fd.full_name} cannot say so: "
                    "make it a message or a proto3 `optional` field"
                )
            if not message.HasField(fd.name):
                values[f.name] = None
                continue
            hint = inner
        values[f.name] = _from_wire(hint, raw)
    return cls(**values)


# NaN and infinity travel as JSON's NaN/Infinity constants (a diverging training loss must
# not make a job unreadable).
# NaN stays NaN (a diverged loss is data, not an error); bytes (keys, certificates,
# signatures) travel as base64, which any JSON reader can take.
_JSON_CONFIG = ConfigDict(
    ser_json_inf_nan="constants", ser_json_bytes="base64", val_json_bytes="base64"
)


@functools.cache
def _adapter(cls: Any) -> TypeAdapter[Any]:
    if dataclasses.is_dataclass(cls):
        # A dataclass carries its own pydantic config (TypeAdapter refuses one for it).
        if "__pydantic_config__" not in vars(cls):
            cls.__pydantic_config__ = _JSON_CONFIG  # type: ignore[union-attr]
        return TypeAdapter(cls)
    return TypeAdapter(cls, config=_JSON_CONFIG)


def to_json(obj: Any, cls: Any = None) -> str:
    """JSON text of a domain object (or of a value of type `cls`, e.g. a tuple of them)."""
    return _adapter(typing.cast(Any, cls if cls is not None else type(obj))).dump_json(obj).decode()


def from_json(cls: type[T], text: str | bytes) -> T:
    """The object of type `cls` that :func:`to_json` wrote."""
    value: T = _adapter(typing.cast(Any, cls)).validate_json(text)
    return value


def to_jsonable(obj: Any) -> Any:
    """Plain lists, dicts and scalars, for `--json` output and logs."""
    return _adapter(typing.cast(Any, type(obj))).dump_python(obj, mode="json")
