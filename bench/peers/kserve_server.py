"""KServe's Python model server (PyPI `kserve`) serving an ONNX file with onnxruntime, for bench.serving.

    bench/.venvs/kserve/bin/python bench/peers/kserve_server.py --model-file M.onnx --model-name digits \
        --intra-op-threads 0 --http_port 8080 --grpc_port 8081

A `kserve.Model` subclass, as KServe's docs write custom predictors: `load` builds the session,
`predict` takes the v2 InferRequest (raw inputs from gRPC) and answers an InferResponse. Flags other
than ours are KServe's own (kserve.model_server parses sys.argv at import).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ours = argparse.ArgumentParser(add_help=False)
ours.add_argument("--model-file", required=True)
ours.add_argument("--model-name", default="digits")
ours.add_argument("--intra-op-threads", type=int, default=0)
ARGS, rest = ours.parse_known_args()
sys.argv = [sys.argv[0], *rest]  # kserve parses the rest (ports, workers) when imported

from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer  # noqa: E402
from ort_session import make_session  # noqa: E402


class OnnxModel(Model):
    def __init__(self, name: str, path: str, intra_op_threads: int) -> None:
        super().__init__(name)
        self.path = path
        self.intra_op_threads = intra_op_threads
        self.session = None

    def load(self) -> bool:
        self.session = make_session(self.path, self.intra_op_threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        feed = {i.name: i.as_numpy() for i in payload.inputs}
        results = self.session.run(self.output_names, feed)
        outputs = []
        for name, array in zip(self.output_names, results):
            out = InferOutput(name=name, shape=list(array.shape), datatype="FP32")
            out.set_data_from_numpy(array, binary_data=payload.use_binary_outputs)
            outputs.append(out)
        return InferResponse(
            model_name=self.name, infer_outputs=outputs, response_id=payload.id, use_binary_outputs=payload.use_binary_outputs
        )


if __name__ == "__main__":
    model = OnnxModel(ARGS.model_name, ARGS.model_file, ARGS.intra_op_threads)
    model.load()
    ModelServer().start([model])
