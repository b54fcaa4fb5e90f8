"""The floor: a gRPC server on Python's grpc aio stack that does the least an Open Inference Protocol
server must do, and nothing else. For bench.serving.

    .venv/bin/python bench/peers/floor_server.py --port 8001 --model-name digits --outputs 10
    .venv/bin/python bench/peers/floor_server.py --port 8001 --model-name digits --model-file M.onnx

Without --model-file, ModelInfer parses the request (protobuf, as every server must) and answers
one pre-serialized ModelInferResponse of FP32 [1, N] zeros: no model, no routing, no metrics, no
copies. Its throughput under the same load is the most any server built on Python's grpc aio
(slimserve, KServe's model server, MLServer) can reach on this machine with this client: a
ceiling, not a peer. With --model-file it also runs the model: raw FP32 input to numpy without a
copy, one ONNX Runtime call on the event loop (the session peers build, bench/peers/ort_session.py),
the first output answered raw -- a hand-written server with no batching, routing, metrics, checks
or error handling: the ceiling for serving this model. ServerReady and ModelReady answer true so
the benchmark's readiness check works unchanged.
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
import numpy as np

from slimserve.protos import inference_pb2 as pb

SERVICE = "inference.GRPCInferenceService"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-name", default="digits")
    parser.add_argument("--outputs", type=int, default=10, help="width of the FP32 [1, N] answer")
    parser.add_argument("--model-file", help="ONNX model to run per request (one FP32 input, raw)")
    parser.add_argument("--intra-op-threads", type=int, default=1)
    args = parser.parse_args()
    answer = pb.ModelInferResponse(model_name=args.model_name, model_version="1")
    answer.outputs.add(name="logits", datatype="FP32", shape=[1, args.outputs])
    answer.raw_output_contents.append(np.zeros((1, args.outputs), np.float32).tobytes())
    answer_bytes = answer.SerializeToString()
    ready = pb.ServerReadyResponse(ready=True).SerializeToString()
    model_ready = pb.ModelReadyResponse(ready=True).SerializeToString()

    async def infer(request: bytes, context) -> bytes:
        pb.ModelInferRequest.FromString(request)
        return answer_bytes

    if args.model_file:
        from ort_session import make_session

        session = make_session(args.model_file, args.intra_op_threads)
        input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name

        async def infer(request: bytes, context) -> bytes:
            parsed = pb.ModelInferRequest.FromString(request)
            x = np.frombuffer(parsed.raw_input_contents[0], np.float32).reshape(tuple(parsed.inputs[0].shape))
            y = session.run([output_name], {input_name: x})[0]
            response = pb.ModelInferResponse(model_name=parsed.model_name, model_version="1", id=parsed.id)
            response.outputs.add(name=output_name, datatype="FP32", shape=y.shape)
            response.raw_output_contents.append(y.tobytes())
            return response.SerializeToString()

    async def server_ready(request: bytes, context) -> bytes:
        return ready

    async def is_model_ready(request: bytes, context) -> bytes:
        return model_ready

    async def serve() -> None:
        handlers = {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
            "ServerReady": grpc.unary_unary_rpc_method_handler(server_ready),
            "ModelReady": grpc.unary_unary_rpc_method_handler(is_model_ready),
        }
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        if server.add_insecure_port(f"127.0.0.1:{args.port}") == 0:
            raise SystemExit(f"cannot listen on 127.0.0.1:{args.port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
