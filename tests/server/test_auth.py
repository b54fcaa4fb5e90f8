"""--token-file: management calls need the bearer token; inference stays open unless --protect-inference."""

import pytest

from slimserve.client.client import SlimServeClient, SlimServeClientError

TOKEN = "s3cret-token-0123456789"


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def code_of(fn):
    with pytest.raises(SlimServeClientError) as e:
        fn()
    return e.value.code, e.value.message


def test_management_needs_the_token(server_factory, token_file, digits):
    server = server_factory(token_file=token_file)
    with SlimServeClient(server.address, token=TOKEN) as good:
        good.register("digits", digits.onnx)
    with SlimServeClient(server.address, token="") as anonymous:
        code, message = code_of(anonymous.models)
        assert code == "UNAUTHENTICATED" and "missing 'authorization: Bearer <token>'" in message
        assert code_of(lambda: anonymous.register("other", digits.onnx))[0] == "UNAUTHENTICATED"
        # Inference stays open, and so does health.
        assert anonymous.infer("digits", {"x": digits.x_test[:1]})[0] == "baseline"
        assert anonymous.server_live()
    with SlimServeClient(server.address, token="wrong-token-000000000") as wrong:
        assert code_of(wrong.models) == ("UNAUTHENTICATED", "the bearer token is wrong; pass --token or set SLIMSERVE_TOKEN")


def test_protect_inference(server_factory, token_file, digits):
    server = server_factory(token_file=token_file, protect_inference=True)
    with SlimServeClient(server.address, token=TOKEN) as good:
        good.register("digits", digits.onnx)
        assert good.infer("digits", {"x": digits.x_test[:1]})[0] == "baseline"
    with SlimServeClient(server.address, token="") as anonymous:
        assert code_of(lambda: anonymous.infer("digits", {"x": digits.x_test[:1]}))[0] == "UNAUTHENTICATED"


def test_short_token_refused_at_start(tmp_path):
    from slimserve.server.grpc.auth import read_token

    (tmp_path / "t").write_text("abc")
    with pytest.raises(OSError, match="at least 16"):
        read_token(tmp_path / "t")


def test_protect_inference_covers_the_stream(server_factory, token_file, digits):
    import grpc

    from slimserve.protos import inference_pb2 as pb
    from slimserve.protos import inference_pb2_grpc as pb_grpc

    server = server_factory(token_file=token_file, protect_inference=True)
    with SlimServeClient(server.address, token=TOKEN) as good:
        good.register("digits", digits.onnx)
    request = pb.ModelInferRequest(model_name="digits", id="s")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 1, 8, 8])
    request.raw_input_contents.append(digits.x_test[:1].tobytes())
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as denied:
            list(stub.ModelStreamInfer(iter([request]), timeout=30))
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = list(stub.ModelStreamInfer(iter([request]), timeout=30, metadata=(("authorization", f"Bearer {TOKEN}"),)))
        assert [a.infer_response.id for a in answers] == ["s"] and not answers[0].error_message
