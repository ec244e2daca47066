"""Reading and writing IDX files, and refusing every kind of corrupt one with a DataError."""

import gzip
import re
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyrossl.data import read_idx, write_idx
from pyrossl.errors import DataError


def idx_bytes(type_code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    """Return a raw IDX file: magic number, big-endian uint32 sizes, payload."""
    return bytes([0, 0, type_code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + payload


@pytest.mark.parametrize("name", ["labels-idx1-ubyte", "labels-idx1-ubyte.gz"])
def test_labels_round_trip(tmp_path, name):
    labels = np.array([5, 0, 4, 1, 9, 2], dtype=np.uint8)
    write_idx(tmp_path / name, labels)
    read = read_idx(tmp_path / name)
    assert read.dtype == np.uint8 and read.shape == (6,)
    np.testing.assert_array_equal(read, labels)


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_images_round_trip(tmp_path, name):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / name, images)
    read = read_idx(tmp_path / name)
    assert read.shape == (3, 28, 28)
    np.testing.assert_array_equal(read, images)
    assert read.flags.writeable


def test_gzip_written_only_for_gz_names(tmp_path):
    write_idx(tmp_path / "a.gz", np.zeros(4, np.uint8))
    write_idx(tmp_path / "a", np.zeros(4, np.uint8))
    assert (tmp_path / "a.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert (tmp_path / "a").read_bytes()[:4] == b"\x00\x00\x08\x01"


def test_gzip_detected_by_content_not_name(tmp_path):
    path = tmp_path / "labels-without-extension"
    path.write_bytes(gzip.compress(idx_bytes(0x08, (3,), b"\x01\x02\x03")))
    np.testing.assert_array_equal(read_idx(path), [1, 2, 3])


@pytest.mark.parametrize(
    "dtype",
    [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64],
)
def test_every_element_type_big_endian(tmp_path, dtype):
    array = np.arange(-3, 9).reshape(2, 3, 2).astype(dtype)
    if np.dtype(dtype).kind == "u":
        array = np.abs(array)
    write_idx(tmp_path / "x", array)
    payload = (tmp_path / "x").read_bytes()[4 + 4 * 3 :]
    assert payload == array.astype(np.dtype(dtype).newbyteorder(">")).tobytes()
    read = read_idx(tmp_path / "x")
    assert read.dtype == np.dtype(dtype) and read.dtype.isnative
    np.testing.assert_array_equal(read, array)


def test_four_dimensions(tmp_path):
    array = np.arange(24, dtype=np.int16).reshape(1, 2, 3, 4)
    write_idx(tmp_path / "x", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), array)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b"\x00\x00", "too short"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "not an IDX file"),
        (idx_bytes(0x0A, (1,), b"\x00"), "unknown IDX element type 0x0A"),
        (bytes([0, 0, 8, 0]), "0 dimensions"),
        (bytes([0, 0, 8, 5]) + b"\x00" * 20, "5 dimensions"),
        (bytes([0, 0, 8, 3]) + struct.pack(">I", 2), "truncated IDX header"),
        (idx_bytes(0x08, (2, 2, 2), b"\x00" * 7), "truncated: shape (2, 2, 2) of uint8 needs 8 data bytes, found 7"),
        (idx_bytes(0x08, (4,), b"\x00" * 5), "too long: shape (4,) of uint8 needs 4 data bytes, found 5"),
        (idx_bytes(0x0C, (2,), b"\x00" * 4), "needs 8 data bytes, found 4"),
    ],
    ids=["empty", "short", "magic", "type", "0-dims", "5-dims", "header", "truncated", "too-long", "int32-short"],
)
def test_corrupt_raw_files(tmp_path, content, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(message)) as caught:
        read_idx(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_corrupt_gzipped_payload_reports_byte_counts(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(idx_bytes(0x08, (10, 2), b"\x00" * 15)))
    with pytest.raises(DataError, match="needs 20 data bytes, found 15"):
        read_idx(path)


def test_gz_name_on_uncompressed_file(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(idx_bytes(0x08, (1,), b"\x07"))
    with pytest.raises(DataError, match="named .gz but not gzip-compressed"):
        read_idx(path)


def test_truncated_gzip_stream(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(0x08, (100,), bytes(range(100))))[:-12])
    with pytest.raises(DataError, match="corrupt gzip data"):
        read_idx(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_idx(tmp_path / "absent")


def test_write_refuses_what_idx_cannot_hold(tmp_path):
    with pytest.raises(DataError, match="cannot store int64"):
        write_idx(tmp_path / "x", np.zeros(3, np.int64))
    with pytest.raises(DataError, match="1 to 4 dimensions"):
        write_idx(tmp_path / "x", np.zeros((1, 1, 1, 1, 1), np.uint8))


def declared_shape(raw: bytes) -> tuple[int, ...]:
    ndim = raw[3]
    return struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])


small_arrays = st.tuples(
    st.sampled_from([np.uint8, np.int16, np.float32]),
    st.lists(st.integers(0, 4), min_size=1, max_size=3),
    st.integers(0, 2**32 - 1),
)
mutations = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    spec=small_arrays,
    mutations=mutations,
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
    extra=st.binary(max_size=3),
    compress=st.sampled_from(["before mutating", "after mutating", "no"]),
)
def test_mutated_files_parse_to_their_declared_shape_or_raise_data_error(
    tmp_path, spec, mutations, cut, extra, compress
):
    dtype, shape, seed = spec
    array = np.random.default_rng(seed).integers(0, 100, size=shape).astype(dtype)
    code = {np.uint8: 0x08, np.int16: 0x0B, np.float32: 0x0D}[dtype]
    data = idx_bytes(code, tuple(shape), array.astype(np.dtype(dtype).newbyteorder(">")).tobytes())
    if compress == "before mutating":
        data = gzip.compress(data, mtime=0)
    data = bytearray(data)
    for position, value in mutations:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    data = bytes(data + extra)
    if compress == "after mutating":
        data = gzip.compress(data, mtime=0)
    path = tmp_path / ("mutated" if compress == "no" else "mutated.gz")
    path.write_bytes(data)
    try:
        result = read_idx(path)
    except DataError as error:
        assert "\n" not in str(error)
        return
    content = gzip.decompress(data) if compress != "no" else data
    assert result.shape == declared_shape(content)
    assert result.nbytes == len(content) - 4 - 4 * len(result.shape)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=64))
def test_random_bytes_never_raise_anything_but_data_error(tmp_path, data):
    path = tmp_path / "random"
    path.write_bytes(data)
    try:
        result = read_idx(path)
    except DataError:
        return
    assert result.shape == declared_shape(data)
