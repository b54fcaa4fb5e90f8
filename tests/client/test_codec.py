"""The tensor codec: every datatype both ways, raw and typed, and precise errors for malformed tensors."""

import numpy as np
import pytest

from slimserve.client import codec
from slimserve.protos import inference_pb2 as pb
from tests.conftest import ECHO_TYPES, echo_arrays


@pytest.mark.parametrize("raw", [True, False])
def test_every_datatype_round_trips(raw):
    arrays = echo_arrays()
    request = pb.ModelInferRequest(model_name="m")
    for name, array in arrays.items():
        if not raw and codec.datatype_of(array) == "FP16":
            continue  # FP16 has no typed field in the protocol
        codec.fill_input(request, name, array, raw=raw)
    decoded = codec.decode_request_inputs(pb.ModelInferRequest.FromString(request.SerializeToString()))
    for name, array in decoded.items():
        expected = arrays[name]
        assert array.shape == expected.shape
        if expected.dtype == object:
            assert array.tolist() == expected.tolist()
        else:
            assert array.dtype == expected.dtype
            np.testing.assert_array_equal(array, expected)


def test_datatype_names_cover_the_protocol():
    assert set(codec.DATATYPE_TO_NUMPY) == set(ECHO_TYPES)


def test_raw_decode_is_a_view_not_a_copy():
    data = np.arange(12, dtype=np.float32).tobytes()
    array = codec.decode_raw(data, "FP32", [3, 4], "x")
    assert not array.flags.owndata


def test_bytes_wire_format_matches_triton():
    raw = codec.serialize_bytes(np.array([b"ab", b""], dtype=object))
    assert raw == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"


def test_raw_size_mismatch_names_tensor_and_sizes():
    with pytest.raises(codec.TensorCodecError, match=r"tensor 'x': FP32 \[2, 3\] needs 24 bytes of raw data, got 8"):
        codec.decode_raw(b"\0" * 8, "FP32", [2, 3], "x")


def test_typed_count_mismatch():
    contents = pb.InferTensorContents(fp32_contents=[1.0, 2.0])
    with pytest.raises(codec.TensorCodecError, match=r"shape \[3\] needs 3 values, got 2 in fp32_contents"):
        codec.decode_contents(contents, "FP32", [3], "x")


def test_unknown_datatype_lists_known_ones():
    with pytest.raises(codec.TensorCodecError, match=r"unknown datatype 'FLOAT'.*FP32"):
        codec.decode_raw(b"", "FLOAT", [0], "x")


def test_truncated_bytes_tensor():
    with pytest.raises(codec.TensorCodecError, match="BYTES element 0 claims 9 bytes"):
        codec.deserialize_bytes(b"\x09\x00\x00\x00abc", 1, "s")


def test_negative_dimension_refused():
    with pytest.raises(codec.TensorCodecError, match="negative dimension"):
        codec.decode_raw(b"", "FP32", [-1, 3], "x")


def test_raw_count_must_match_inputs():
    request = pb.ModelInferRequest()
    codec.fill_input(request, "a", np.zeros(2, np.float32))
    request.inputs.add(name="b", datatype="FP32", shape=[2])
    with pytest.raises(codec.TensorCodecError, match="2 inputs but 1 raw_input_contents"):
        codec.decode_request_inputs(request)


def test_out_of_range_typed_int8():
    contents = pb.InferTensorContents(int_contents=[300])
    with pytest.raises(codec.TensorCodecError, match="out of range for INT8"):
        codec.decode_contents(contents, "INT8", [1], "x")
