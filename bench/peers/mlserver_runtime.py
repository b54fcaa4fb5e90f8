"""An MLServer (PyPI `mlserver`) custom runtime serving an ONNX file with onnxruntime, for bench.serving.

bench.serving writes a model repository whose model-settings.json names `mlserver_runtime.OnnxRuntimeModel`
with adaptive batching on (max_batch_size, max_batch_time), and starts `mlserver start DIR` from
bench/.venvs/mlserver. The model file and thread settings travel in the model's `parameters.extra`.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from ort_session import make_session


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        extra = (self.settings.parameters.extra if self.settings.parameters else None) or {}
        self.session = make_session(extra["model_file"], int(extra.get("intra_op_threads", 0)))
        self.output_names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        results = self.session.run(self.output_names, feed)
        outputs = [NumpyCodec.encode_output(name, array) for name, array in zip(self.output_names, results)]
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=outputs)
