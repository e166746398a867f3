"""msgpack without copying `bin` payloads: a reader that returns views, a writer that splices.

msgpack's C extension copies every `bin` into a new `bytes`, and its packer grows its buffer
by reallocation; for a 20 MB tensor both cost milliseconds. Large messages go through here
instead: the reader returns `bin` values as read-only `memoryview`s on the received bytes,
and the writer joins pre-packed pieces with the tensors' own buffers in one copy.

The reader mirrors `msgpack.unpackb(raw=False, strict_map_key=True)`: str or bytes map keys,
`ExtType` or `Timestamp` for extensions, an error on trailing bytes. It also bounds nesting
by `max_nesting`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any, Final

import msgpack

from schemas.errors import DecodeError, PayloadTooLargeError

_U8: Final = struct.Struct(">B").unpack_from
_U16: Final = struct.Struct(">H").unpack_from
_U32: Final = struct.Struct(">I").unpack_from
_U64: Final = struct.Struct(">Q").unpack_from
_I8: Final = struct.Struct(">b").unpack_from
_I16: Final = struct.Struct(">h").unpack_from
_I32: Final = struct.Struct(">i").unpack_from
_I64: Final = struct.Struct(">q").unpack_from
_F32: Final = struct.Struct(">f").unpack_from
_F64: Final = struct.Struct(">d").unpack_from

# Fixed-width scalars: marker -> (reader, size of the value after the marker).
_SCALARS: Final = {
    0xCA: (_F32, 4),
    0xCB: (_F64, 8),
    0xCC: (_U8, 1),
    0xCD: (_U16, 2),
    0xCE: (_U32, 4),
    0xCF: (_U64, 8),
    0xD0: (_I8, 1),
    0xD1: (_I16, 2),
    0xD2: (_I32, 4),
    0xD3: (_I64, 8),
}
# Variable-length families: marker -> (reader of the length, size of the length field).
_LENGTHS: Final = {
    0xC4: (_U8, 1),
    0xC5: (_U16, 2),
    0xC6: (_U32, 4),
    0xC7: (_U8, 1),
    0xC8: (_U16, 2),
    0xC9: (_U32, 4),
    0xD9: (_U8, 1),
    0xDA: (_U16, 2),
    0xDB: (_U32, 4),
    0xDC: (_U16, 2),
    0xDD: (_U32, 4),
    0xDE: (_U16, 2),
    0xDF: (_U32, 4),
}
_FIXEXT_SIZES: Final = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
_TIMESTAMP_EXT: Final = -1


class _Reader:
    """One pass over one message; `position` is the next unread byte."""

    __slots__ = ("max_nesting", "payload", "position", "view")

    def __init__(self, payload: bytes, max_nesting: int) -> None:
        self.payload = payload
        self.view = memoryview(payload)
        self.position = 0
        self.max_nesting = max_nesting

    def take(self, size: int) -> int:
        """Reserve `size` bytes; return where they start."""
        start = self.position
        end = start + size
        if end > len(self.payload):
            raise DecodeError(f"msgpack: truncated, {size} bytes declared at offset {start}")
        self.position = end
        return start

    def read(self, depth: int) -> Any:
        payload = self.payload
        marker = payload[self.take(1)]
        if marker <= 0x7F:
            return marker
        if marker >= 0xE0:
            return marker - 0x100
        if 0xA0 <= marker <= 0xBF:
            return self.text(marker & 0x1F)
        if 0x90 <= marker <= 0x9F:
            return self.array(marker & 0x0F, depth)
        if 0x80 <= marker <= 0x8F:
            return self.map(marker & 0x0F, depth)
        if marker == 0xC0:
            return None
        if marker == 0xC2:
            return False
        if marker == 0xC3:
            return True
        scalar = _SCALARS.get(marker)
        if scalar is not None:
            unpack, size = scalar
            return unpack(payload, self.take(size))[0]
        if marker in _FIXEXT_SIZES:
            return self.ext(_FIXEXT_SIZES[marker])
        length = _LENGTHS.get(marker)
        if length is None:
            raise DecodeError(
                f"msgpack: invalid marker 0x{marker:02x} at offset {self.position - 1}"
            )
        unpack, size = length
        count: int = unpack(payload, self.take(size))[0]
        if marker <= 0xC6:
            start = self.take(count)
            return self.view[start : start + count]
        if marker <= 0xC9:
            return self.ext(count)
        if marker <= 0xDB:
            return self.text(count)
        if marker <= 0xDD:
            return self.array(count, depth)
        return self.map(count, depth)

    def text(self, size: int) -> str:
        start = self.take(size)
        try:
            return self.payload[start : start + size].decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError(f"msgpack: invalid UTF-8 in the str at offset {start}") from None

    def ext(self, size: int) -> msgpack.ExtType | msgpack.Timestamp:
        code = _I8(self.payload, self.take(1))[0]
        start = self.take(size)
        data = self.payload[start : start + size]
        try:
            if code == _TIMESTAMP_EXT:
                return msgpack.Timestamp.from_bytes(data)
            return msgpack.ExtType(code, data)
        except ValueError:  # a reserved (negative) type, or a malformed timestamp
            raise DecodeError(f"msgpack: invalid extension {code} at offset {start}") from None

    def enter(self, depth: int, count: int) -> None:
        if depth >= self.max_nesting:
            raise PayloadTooLargeError(f"msgpack: nested deeper than {self.max_nesting} levels")
        # Every item takes at least one byte: refuse counts the rest cannot hold.
        if count > len(self.payload) - self.position:
            raise DecodeError(f"msgpack: {count} items declared, fewer bytes remain")

    def array(self, count: int, depth: int) -> list[Any]:
        self.enter(depth, count)
        return [self.read(depth + 1) for _ in range(count)]

    def map(self, count: int, depth: int) -> dict[Any, Any]:
        self.enter(depth, 2 * count)
        result: dict[Any, Any] = {}
        for _ in range(count):
            key = self.read(depth + 1)
            if isinstance(key, memoryview):
                key = key.tobytes()
            elif not isinstance(key, str):
                raise DecodeError(f"msgpack: map key of type {type(key).__name__}, not str")
            result[key] = self.read(depth + 1)
        return result


def unpack_views(payload: bytes, *, max_nesting: int) -> Any:
    """Unpack one msgpack value; `bin` values come back as read-only views on `payload`."""
    reader = _Reader(payload, max_nesting)
    try:
        value = reader.read(0)
    except struct.error:  # a fixed-width value cut short
        raise DecodeError("msgpack: truncated") from None
    except RecursionError:  # only when called already deep in the stack
        raise PayloadTooLargeError("msgpack: nested too deep for the stack") from None
    if reader.position != len(payload):
        raise DecodeError(f"msgpack: {len(payload) - reader.position} bytes after the message")
    return value


def bin_header(size: int) -> bytes:
    """The msgpack header of a `bin` of `size` bytes."""
    if size < 0x100:
        return struct.pack(">BB", 0xC4, size)
    if size < 0x10000:
        return struct.pack(">BH", 0xC5, size)
    return struct.pack(">BI", 0xC6, size)


def pack_spliced(message: dict[str, Any]) -> bytes:
    """Pack `message` like `msgpack.packb`, copying each `memoryview` value only once.

    The views (bytes, format `B`) may be values of the message itself or of maps in its
    lists (the tensors of `inputs`/`outputs`); anything else is packed by msgpack.
    """
    pieces: list[bytes | memoryview] = []
    _pack_map(message, pieces, nested=True)
    return b"".join(pieces)


def _pack_map(message: dict[str, Any], pieces: list[bytes | memoryview], *, nested: bool) -> None:
    packer = msgpack.Packer()
    pieces.append(packer.pack_map_header(len(message)))
    for key, value in message.items():
        pieces.append(packer.pack(key))
        if isinstance(value, memoryview):
            pieces.append(bin_header(value.nbytes))
            pieces.append(value)
        elif nested and isinstance(value, list) and _holds_maps(value):
            pieces.append(packer.pack_array_header(len(value)))
            for item in value:
                _pack_map(item, pieces, nested=False)
        else:
            pieces.append(packer.pack(value))


def _holds_maps(values: Iterable[Any]) -> bool:
    return all(isinstance(value, dict) for value in values)
