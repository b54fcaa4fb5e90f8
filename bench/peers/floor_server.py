"""The floor: a gRPC server on Python's grpc aio stack that does the least an Open Inference Protocol
server must do, and nothing else. For bench.serving.

    .venv/bin/python bench/peers/floor_server.py --port 8001 --model-name digits --outputs 10

ModelInfer parses the request (protobuf, as every server must) and answers one pre-serialized
ModelInferResponse of FP32 [1, N] zeros: no model, no routing, no metrics, no copies. Its
throughput under the same load is the most any server built on Python's grpc aio (slimserve,
KServe's model server, MLServer) can reach on this machine with this client: a ceiling, not a
peer. ServerReady and ModelReady answer true so the benchmark's readiness check works unchanged.
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
import numpy as np

from protos import inference_pb2 as pb

SERVICE = "inference.GRPCInferenceService"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-name", default="digits")
    parser.add_argument("--outputs", type=int, default=10, help="width of the FP32 [1, N] answer")
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
