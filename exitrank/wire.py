"""Which field makes a request unparsable: a walk over the protobuf wire format (no grpc).

protobuf refuses a message whose string field holds invalid UTF-8 (a raw client can send any
bytes) with "String field had bad UTF-8" and no field name, and gRPC turns the parse failure into
UNKNOWN. The server's guard (``exitrank.grpc_security.ServerGuard``) answers INVALID_ARGUMENT
instead, with the message of :func:`malformed_field`::

    malformed_field(raw, retriever_pb2.NearestUsersRequest.DESCRIPTOR)  # "user_id: invalid UTF-8 ..."

Repeated fields are named with their index (``candidate_item_ids[3]``), nested ones with dots
(``exit_policy.threshold``), map entries as ``attributes[<n>].key``/``.value``.

The walk is Python: about a second of CPU per MiB of small fields. It runs only for messages up to
:data:`MAX_WALK_BYTES` (every hand-written request; the bad-input tests' cases); a larger one that
protobuf's C parser refused is "request: not a valid <Message> (invalid UTF-8 or wire format)"
without a field, so a flood of malformed 4 MiB requests costs the server C-speed parsing only.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
MAX_WALK_BYTES = 64 * 1024  # ~60 ms of walk at most, on a loaded 2-core box


class _Corrupt(Exception):
    """The bytes are not protobuf wire format at ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


def _varint(raw: bytes, pos: int, path: str) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise _Corrupt(path)
        byte = raw[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _bad_string(raw: bytes, descriptor: Descriptor, prefix: str) -> str | None:
    """The path of the first string field of ``raw`` that is not UTF-8, or None; _Corrupt when
    the bytes are not wire format."""
    counts: dict[int, int] = {}
    pos = 0
    while pos < len(raw):
        key, pos = _varint(raw, pos, prefix.rstrip(".") or "request")
        number, wire = key >> 3, key & 7
        field = descriptor.fields_by_number.get(number)
        name = prefix + (field.name if field is not None else f"<field {number}>")
        if field is not None and field.is_repeated:
            index = counts[number] = counts.get(number, -1) + 1
            name = f"{name}[{index}]"
        if wire == _VARINT:
            _, pos = _varint(raw, pos, name)
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
        elif wire == _LEN:
            size, pos = _varint(raw, pos, name)
            if pos + size > len(raw):
                raise _Corrupt(name)
            body = raw[pos : pos + size]
            pos += size
            if field is None:
                continue
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    body.decode("utf-8")
                except UnicodeDecodeError:
                    return name
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                found = _bad_string(body, field.message_type, name + ".")
                if found is not None:
                    return found
        else:
            raise _Corrupt(name)
    if pos > len(raw):
        raise _Corrupt(prefix.rstrip(".") or "request")
    return None


def malformed_field(raw: bytes, descriptor: Descriptor, *, max_walk_bytes: int = MAX_WALK_BYTES) -> str:
    """Why ``raw`` does not parse as ``descriptor``'s message, starting with the field's path
    (``request`` without walking it when ``raw`` is over ``max_walk_bytes``)."""
    if len(raw) > max_walk_bytes:
        return f"request: not a valid {descriptor.full_name} (invalid UTF-8 or wire format)"
    try:
        field = _bad_string(raw, descriptor, "")
    except _Corrupt as exc:
        return f"{exc.path}: not valid protobuf wire format for {descriptor.full_name}"
    if field is None:
        return f"request: not a valid {descriptor.full_name} message"
    return f"{field}: invalid UTF-8 (protobuf string fields must be valid UTF-8)"
