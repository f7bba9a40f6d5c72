"""The initializers of an ONNX model, read with the standard library and numpy.

An ONNX file is a protocol buffer (``ModelProto``). The numpy path of the
runtime needs only the weights, the graph's initializers, so this module walks
the protobuf wire format itself instead of depending on the ``onnx`` package:

    ModelProto.graph (field 7)          GraphProto
    GraphProto.initializer (field 5)    TensorProto, repeated
    TensorProto: dims (1), data_type (2), float_data (4), int32_data (5),
                 int64_data (7), name (8), raw_data (9), data_location (14)

Wire format: each field is a varint key ``number << 3 | wire_type``, followed by
a varint (type 0), 8 bytes (type 1), a varint length and that many bytes
(type 2) or 4 bytes (type 5).
"""

from __future__ import annotations

import numpy as np

# TensorProto.DataType -> numpy dtype, for the types an export uses.
DTYPES = {
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    4: np.uint16,
    5: np.int16,
    6: np.int32,
    7: np.int64,
    9: np.bool_,
    10: np.float16,
    11: np.float64,
    12: np.uint32,
    13: np.uint64,
}
_GRAPH, _INITIALIZER = 7, 5
_DIMS, _DATA_TYPE, _FLOAT_DATA, _INT32_DATA = 1, 2, 4, 5
_INT64_DATA, _NAME, _RAW_DATA, _DATA_LOCATION = 7, 8, 9, 14


class ProtobufError(ValueError):
    """The bytes are not a well-formed ONNX model."""


def read_initializers(data: bytes) -> dict[str, np.ndarray]:
    """Every initializer of the model's main graph, by name."""
    graphs = [value for number, value in _fields(data) if number == _GRAPH]
    if len(graphs) != 1:
        raise ProtobufError(f"expected one graph in the model, found {len(graphs)}")
    return dict(
        _tensor(value) for number, value in _fields(graphs[0]) if number == _INITIALIZER
    )


def _tensor(data: bytes) -> tuple[str, np.ndarray]:
    dims: list[int] = []
    data_type = 0
    name = ""
    raw = None
    typed: dict[int, list] = {}
    for number, value in _fields(data):
        if number == _DIMS:
            dims += _varints(value) if isinstance(value, bytes) else [value]
        elif number == _DATA_TYPE:
            data_type = value
        elif number == _NAME:
            name = value.decode("utf-8")
        elif number == _RAW_DATA:
            raw = value
        elif number == _DATA_LOCATION and value == 1:
            raise ProtobufError(f"initializer {name!r} keeps its data in another file")
        elif number in (_FLOAT_DATA, _INT32_DATA, _INT64_DATA):
            typed.setdefault(number, []).append(value)
    if data_type not in DTYPES:
        raise ProtobufError(f"initializer {name!r} has unsupported type {data_type}")
    dtype = np.dtype(DTYPES[data_type])
    dims = [_signed(d) for d in dims]

    if raw is not None:
        array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)
    elif _FLOAT_DATA in typed:
        array = np.frombuffer(b"".join(typed[_FLOAT_DATA]), dtype="<f4")
    elif _INT64_DATA in typed:
        array = np.array([_signed(v) for v in _unpacked(typed[_INT64_DATA])])
    elif _INT32_DATA in typed:
        # int32_data holds every type of 32 bits or less, bool included.
        array = np.array([_signed(v) for v in _unpacked(typed[_INT32_DATA])])
    else:
        array = np.zeros(0)
    return name, array.astype(dtype, copy=False).reshape(dims)


def _unpacked(values: list) -> list[int]:
    out: list[int] = []
    for value in values:
        out += _varints(value) if isinstance(value, bytes) else [value]
    return out


def _signed(value: int) -> int:
    """A varint read as unsigned, turned into the int64 it encodes."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ProtobufError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _varints(data: bytes) -> list[int]:
    out, pos = [], 0
    while pos < len(data):
        value, pos = _varint(data, pos)
        out.append(value)
    return out


def _fields(data: bytes):
    """(field number, value) pairs; lengths give bytes, varints give ints."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ProtobufError(f"unsupported wire type {wire}")
        if pos > end:
            raise ProtobufError("truncated field")
        yield number, value
