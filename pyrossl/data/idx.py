"""Read and write IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a magic number ``00 00 TT DD`` (``TT`` the element type, ``DD`` the number of
dimensions), then ``DD`` sizes as big-endian ``uint32``, then the elements in C order, big-endian.
Reference: Y. LeCun, C. Cortes, C. Burges, "The MNIST database", section "File formats".
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from pyrossl.errors import DataError
from pyrossl.files import atomic_write_bytes

#: The first two bytes of every gzip stream (RFC 1952).
GZIP_MAGIC = b"\x1f\x8b"

#: IDX type code -> big-endian dtype of the elements.
IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: (dtype kind, item size) -> IDX type code, for writing.
_TYPE_CODES: dict[tuple[str, int], int] = {(dt.kind, dt.itemsize): code for code, dt in IDX_TYPES.items()}

MAX_DIMS = 4


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Return the array stored in the IDX file ``path``, gzip-compressed or not.

    Compression is detected by the gzip magic bytes, not by the file name. The result is a new,
    writable array in native byte order, with the shape and element type the header declares.

    Raises:
        DataError: the file is missing, unreadable, empty, not IDX, a ``.gz`` name on an
            uncompressed file, corrupt gzip, or holds more or fewer bytes than its header declares.
    """
    path = Path(path)
    data = _read_bytes(path)
    if not data:
        raise DataError(f"{path}: empty file, expected IDX data")
    if len(data) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(data)} bytes, expected at least 4)")
    if data[:2] != b"\x00\x00":
        raise DataError(f"{path}: not an IDX file (magic number starts with {data[:2].hex()}, expected 0000)")
    type_code, ndim = data[2], data[3]
    if type_code not in IDX_TYPES:
        supported = ", ".join(f"0x{code:02X}" for code in IDX_TYPES)
        raise DataError(f"{path}: unknown IDX element type 0x{type_code:02X} (supported: {supported})")
    if not 1 <= ndim <= MAX_DIMS:
        raise DataError(f"{path}: IDX header declares {ndim} dimensions, expected 1 to {MAX_DIMS}")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header_size} header bytes, found {len(data)}"
        )
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[type_code]
    expected = math.prod(shape) * dtype.itemsize
    found = len(data) - header_size
    if found != expected:
        problem = "truncated" if found < expected else "too long"
        raise DataError(
            f"{path}: {problem}: shape {shape} of {dtype.newbyteorder('=')} needs {expected} data bytes, found {found}"
        )
    array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=header_size).reshape(shape)
    # astype copies: the result is writable (torch.from_numpy warns on read-only buffers) and native-endian.
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write ``array`` to ``path`` as an IDX file, gzip-compressed when the name ends with ``.gz``.

    The gzip header carries no timestamp, so equal arrays give byte-identical files (stable MD5 sums).

    Raises:
        DataError: the array has an element type IDX cannot hold or 0 or more than 4 dimensions.
    """
    path = Path(path)
    array = np.asarray(array)
    code = _TYPE_CODES.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise DataError(f"{path}: IDX cannot store {array.dtype} (use uint8, int8, int16, int32, float32 or float64)")
    if not 1 <= array.ndim <= MAX_DIMS:
        raise DataError(f"{path}: IDX stores 1 to {MAX_DIMS} dimensions, the array has {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + np.ascontiguousarray(array, dtype=IDX_TYPES[code]).tobytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    atomic_write_bytes(path, lambda f: f.write(data))


def _read_bytes(path: Path) -> bytes:
    """Return the content of ``path``, decompressed when it starts with the gzip magic bytes."""
    try:
        with open(path, "rb") as file:
            compressed = file.read(2) == GZIP_MAGIC
            file.seek(0)
            if compressed:
                with gzip.GzipFile(fileobj=file) as stream:
                    return stream.read()
            if path.name.endswith(".gz"):
                raise DataError(f"{path}: named .gz but not gzip-compressed (no gzip magic bytes 1f 8b)")
            return file.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise DataError(f"{path}: corrupt gzip data ({error or type(error).__name__})") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
