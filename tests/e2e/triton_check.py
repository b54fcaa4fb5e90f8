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
    report.update(stream_check(client, model, meta, x))
    client.close()
    print(json.dumps(report))


def stream_check(client, model: str, meta, x: np.ndarray) -> dict:
    """Triton's streaming API: one request per sample on one stream, plus two that must fail."""
    import queue

    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i in range(len(x)):
        inp = grpcclient.InferInput(meta.inputs[0].name, [1, *x.shape[1:]], meta.inputs[0].datatype)
        inp.set_data_from_numpy(x[i : i + 1])
        client.async_stream_infer(model, [inp], request_id=f"s{i}")
    bad = grpcclient.InferInput(meta.inputs[0].name, [1, 2], "INT64")
    bad.set_data_from_numpy(np.zeros((1, 2), np.int64))
    client.async_stream_infer(model, [bad], request_id="bad")
    client.async_stream_infer("no-such-model", [inp], request_id="missing")
    outputs, errors = {}, []
    for _ in range(len(x) + 2):
        result, error = answers.get(timeout=60)
        if error is not None:
            errors.append(error.message())
        else:
            response = result.get_response()
            outputs[response.id] = result.as_numpy(meta.outputs[0].name).tolist()
    client.stop_stream()
    return {"stream_outputs": outputs, "stream_errors": sorted(errors)}


if __name__ == "__main__":
    main(*sys.argv[1:])
