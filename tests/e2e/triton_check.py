"""Runs an unmodified tritonclient.grpc against a slimserve address; prints what it saw as JSON.

A separate process: tritonclient and slimserve's protos both define package `inference`.
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main(address: str, model: str, input_npy: str) -> None:
    client = grpcclient.InferenceServerClient(url=address)
    x = np.load(input_npy)
    meta = client.get_model_metadata(model)
    inp = grpcclient.InferInput(meta.inputs[0].name, list(x.shape), meta.inputs[0].datatype)
    inp.set_data_from_numpy(x)
    outputs = [grpcclient.InferRequestedOutput(meta.outputs[0].name)]
    result = client.infer(model, [inp], outputs=outputs, request_id="r1")
    report = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "server": client.get_server_metadata().name,
        "platform": meta.platform,
        "id": result.get_response().id,
        "version": result.get_response().model_version,
        "output": result.as_numpy(meta.outputs[0].name).tolist(),
        "index": [m.name for m in client.get_model_repository_index().models],
    }
    try:
        bad = grpcclient.InferInput(meta.inputs[0].name, [1, 2], "INT64")
        bad.set_data_from_numpy(np.zeros((1, 2), np.int64))
        client.infer(model, [bad])
    except InferenceServerException as e:
        report["error_status"] = e.status()
        report["error_message"] = e.message()
    try:
        client.infer("no-such-model", [inp])
    except InferenceServerException as e:
        report["missing_status"] = e.status()
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
