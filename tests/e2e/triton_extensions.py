"""Runs tritonclient.grpc's calls for Triton's extensions against a slimserve serving the digits CNN; prints what it saw.

A separate process (tritonclient and slimserve's protos both define package `inference`). Each check
records its result under its own key, and an error as "<StatusCode>: message", so the test can assert each.
"""

from __future__ import annotations

import json
import queue
import sys

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from google.protobuf.json_format import MessageToDict
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

MODEL = "digits"


def error_of(call) -> str | None:
    try:
        call()
    except InferenceServerException as e:
        return f"{e.status()}: {e.message()}"
    return None


def infer_input(x: np.ndarray) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def config(client) -> dict:
    return MessageToDict(client.get_model_config(MODEL).config, preserving_proto_field_name=True)


def main(address: str, input_npy: str) -> None:
    client = grpcclient.InferenceServerClient(url=address)
    x = np.load(input_npy)
    report: dict = {"extensions": list(client.get_server_metadata().extensions)}

    # 1. typed contents in, raw contents out (as grpc_explicit_*_content_client.py reads them)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
    typed = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = typed.inputs.add(name="x", datatype="FP32", shape=list(x[:2].shape))
    tensor.contents.fp32_contents.extend(x[:2].reshape(-1).tolist())
    response = stub.ModelInfer(typed)
    report["typed_raw"] = [len(response.raw_output_contents), response.outputs[0].HasField("contents")]
    report["typed_logits"] = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 10).tolist()

    # 2. streams: every answer final; enable_empty_final_response adds nothing for a model that answers once
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i in range(3):
        client.async_stream_infer(MODEL, [infer_input(x[i : i + 1])], request_id=f"s{i}", enable_empty_final_response=True)
    finals = []
    for _ in range(3):
        result, error = answers.get(timeout=60)
        finals.append(result.get_response().parameters["triton_final_response"].bool_param if error is None else str(error))
    client.stop_stream()
    report["stream_finals"] = finals
    report["stream_extra"] = answers.qsize()

    # 4. versions
    report["metadata_versions"] = list(client.get_model_metadata(MODEL).versions)
    report["index_versions"] = [(m.name, m.version) for m in client.get_model_repository_index().models]
    pinned = client.infer(MODEL, [infer_input(x[:1])], model_version="1")
    report["pinned"] = [pinned.get_response().model_version, pinned.as_numpy("logits").tolist()]
    report["version_missing"] = error_of(lambda: client.infer(MODEL, [infer_input(x[:1])], model_version="9"))
    report["model_ready_1"] = client.is_model_ready(MODEL, "1")

    # 5. ModelConfig
    report["config"] = config(client)
    report["config_json_max_batch"] = client.get_model_config(MODEL, as_json=True)["config"]["max_batch_size"]

    # 6. ModelStatistics, after what ran above
    for _ in range(4):
        client.infer(MODEL, [infer_input(x[:3])])
    stats = client.get_inference_statistics(MODEL, as_json=True)
    report["statistics"] = stats
    report["statistics_all"] = [s["name"] for s in client.get_inference_statistics(as_json=True)["model_stats"]]
    report["statistics_missing"] = error_of(lambda: client.get_inference_statistics("no-such-model"))

    # 7. load with a config, refused configs and files, unload twice
    good = {
        "max_batch_size": 8,
        "dynamic_batching": {"preferred_batch_size": [4], "max_queue_delay_microseconds": 100},
        "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
    }
    client.load_model(MODEL, config=json.dumps(good))
    report["config_loaded"] = config(client)
    report["config_unknown"] = error_of(lambda: client.load_model(MODEL, config=json.dumps({"sequence_batching": {}})))
    report["config_bad_value"] = error_of(lambda: client.load_model(MODEL, config=json.dumps({"max_batch_size": -1})))
    report["config_bad_json"] = error_of(lambda: client.load_model(MODEL, config="{not json"))
    report["config_files"] = error_of(lambda: client.load_model(MODEL, config="{}", files={"file:1/model.onnx": b"x"}))
    report["config_after_refusals"] = config(client)
    client.load_model(MODEL)
    report["config_reloaded"] = config(client)
    client.unload_model(MODEL)
    report["unload_again"] = error_of(lambda: client.unload_model(MODEL))
    report["unload_missing"] = error_of(lambda: client.unload_model("no-such-model"))
    client.load_model(MODEL)

    # 8. classification
    top = client.infer(MODEL, [infer_input(x[:2])], outputs=[grpcclient.InferRequestedOutput("logits", class_count=3)])
    report["classes"] = [[b.decode() for b in row] for row in top.as_numpy("logits")]
    report["classes_too_many"] = error_of(
        lambda: client.infer(MODEL, [infer_input(x[:1])], outputs=[grpcclient.InferRequestedOutput("logits", class_count=11)])
    )

    # 9. log settings
    report["log_before"] = client.get_log_settings(as_json=True)
    report["log_updated"] = client.update_log_settings({"log_verbose_level": 1, "log_format": "ISO8601"}, as_json=True)
    report["log_bad"] = error_of(lambda: client.update_log_settings({"log_colour": True}))
    client.update_log_settings({"log_verbose_level": 0, "log_format": "default"})
    # 10. trace settings: the server's, one model's own (a copy of the server's at first), cleared back, a bad rate
    report["trace"] = client.get_trace_settings(as_json=True)
    report["trace_model"] = client.update_trace_settings(MODEL, {"trace_rate": "5", "trace_level": ["TIMESTAMPS"]}, as_json=True)
    report["trace_cleared"] = client.update_trace_settings(MODEL, {"trace_rate": None}, as_json=True)
    report["trace_bad"] = error_of(lambda: client.update_trace_settings(settings={"trace_rate": "0"}))
    # CUDA shared memory is not served: nothing to list or unregister (Triton's shm examples call both), registering refused
    report["cuda_shm_status"] = client.get_cuda_shared_memory_status(as_json=True)
    report["cuda_shm_unregister"] = error_of(lambda: client.unregister_cuda_shared_memory())
    report["cuda_shm_register"] = error_of(lambda: client.register_cuda_shared_memory("gpu", b"aGFuZGxl", 0, 64))

    report.update(shared_memory(client, x))
    report["server_live"] = client.is_server_live()
    client.close()
    print(json.dumps(report))


def shared_memory(client, x: np.ndarray) -> dict:
    """Input and output by region (system shared memory), as simple_grpc_shm_client.py does, and the refusals."""
    out: dict = {}
    batch = np.ascontiguousarray(x[:4], np.float32)
    in_handle = shm.create_shared_memory_region("in_data", "/slimserve_test_in", batch.nbytes)
    out_handle = shm.create_shared_memory_region("out_data", "/slimserve_test_out", 4 * 10 * 4)
    try:
        shm.set_shared_memory_region(in_handle, [batch])
        client.register_system_shared_memory("in_data", "/slimserve_test_in", batch.nbytes)
        client.register_system_shared_memory("out_data", "/slimserve_test_out", 4 * 10 * 4)
        out["shm_status"] = sorted(client.get_system_shared_memory_status(as_json=True)["regions"])
        inp = grpcclient.InferInput("x", list(batch.shape), "FP32")
        inp.set_shared_memory("in_data", batch.nbytes)
        requested = grpcclient.InferRequestedOutput("logits")
        requested.set_shared_memory("out_data", 4 * 10 * 4)
        result = client.infer(MODEL, [inp], outputs=[requested])
        meta = result.get_output("logits")
        out["shm_output_shape"] = list(meta.shape)
        out["shm_logits"] = shm.get_contents_as_numpy(out_handle, np.float32, [4, 10]).tolist()
        out["shm_missing_key"] = error_of(lambda: client.register_system_shared_memory("nope", "/slimserve_no_such_key", 64))
        out["shm_too_big"] = error_of(lambda: client.register_system_shared_memory("big", "/slimserve_test_in", batch.nbytes, offset=8))
        out["shm_duplicate"] = error_of(lambda: client.register_system_shared_memory("in_data", "/slimserve_test_in", 64))
        out["shm_traversal"] = error_of(lambda: client.register_system_shared_memory("etc", "/../etc/passwd", 8))
        small = grpcclient.InferRequestedOutput("logits")
        small.set_shared_memory("out_data", 16)
        out["shm_output_too_small"] = error_of(lambda: client.infer(MODEL, [inp], outputs=[small]))
        past = grpcclient.InferInput("x", list(batch.shape), "FP32")
        past.set_shared_memory("in_data", batch.nbytes, offset=64)
        out["shm_input_past_region"] = error_of(lambda: client.infer(MODEL, [past]))
        client.unregister_system_shared_memory("in_data")
        out["shm_unregistered"] = error_of(lambda: client.infer(MODEL, [inp]))
        client.unregister_system_shared_memory()
        out["shm_status_after"] = client.get_system_shared_memory_status(as_json=True).get("regions", {})
    finally:
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)
    return out


if __name__ == "__main__":
    main(*sys.argv[1:])
