"""Triton's extensions through an unmodified tritonclient.grpc: raw answers, final stream flags, versions, ModelConfig,
ModelStatistics, load with a config, classification, log settings and system shared memory (one client run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import ServerHandle

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def seen(tmp_path_factory, digits):
    """One server, one client run of every check; each test asserts one behaviour of what it saw."""
    from slimserve.client.client import SlimServeClient

    server = ServerHandle(tmp_path_factory.mktemp("repository"))
    try:
        with SlimServeClient(server.address) as c:
            c.register("digits", digits.onnx, data=digits.data)
        path = tmp_path_factory.mktemp("x") / "x.npy"
        np.save(path, digits.x_test[:16])
        run = subprocess.run(
            [sys.executable, str(HERE / "triton_extensions.py"), server.address, str(path)], capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr[-4000:]
        return json.loads(run.stdout)
    finally:
        server.stop()


def logits(digits, x):
    return ort.InferenceSession(str(digits.onnx), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_typed_requests_are_answered_raw(seen, digits):
    assert seen["typed_raw"] == [1, False]
    np.testing.assert_allclose(seen["typed_logits"], logits(digits, digits.x_test[:2]), rtol=1e-4, atol=1e-4)


def test_every_stream_answer_is_final_and_a_model_that_answers_once_sends_no_empty_one(seen):
    assert seen["stream_finals"] == [True, True, True] and seen["stream_extra"] == 0


def test_integer_versions_pin_and_are_listed(seen, digits):
    assert seen["metadata_versions"] == ["1", "baseline"]
    assert seen["index_versions"] == [["digits", "1"]]
    assert seen["pinned"][0] == "baseline"
    np.testing.assert_allclose(seen["pinned"][1], logits(digits, digits.x_test[:1]), rtol=1e-4, atol=1e-4)
    assert (
        seen["version_missing"].startswith("StatusCode.NOT_FOUND: ")
        and "no variant '9' (variants: baseline (version 1))" in seen["version_missing"]
    )
    assert seen["model_ready_1"]


def test_model_config_describes_the_served_variant(seen):
    config = seen["config"]
    assert config["name"] == "digits" and config["platform"] == "onnxruntime_onnx" and config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == 32 and seen["config_json_max_batch"] == 32
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": ["1", "8", "8"]}]
    assert config["output"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": ["10"]}]
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": "500"}
    assert config["instance_group"] == [{"name": "digits_1", "kind": "KIND_CPU", "count": 2}]


def test_model_statistics_count_what_ran(seen):
    assert "statistics" in seen["extensions"] and "model_configuration" in seen["extensions"]
    (stats,) = seen["statistics"]["model_stats"]
    assert stats["name"] == "digits" and stats["version"] == "1"
    infer = stats["inference_stats"]
    # requests: 1 typed (2 rows) + 3 streamed + 1 pinned + 4 (3 rows each); the version-9 one never reached a variant
    assert infer["success"]["count"] == "9" and int(infer["success"]["ns"]) > 0
    assert int(stats["inference_count"]) == 2 + 3 + 1 + 12
    assert int(stats["execution_count"]) == sum(int(b["compute_infer"]["count"]) for b in stats["batch_stats"])
    assert int(infer["queue"]["count"]) == 9 and int(infer["compute_infer"]["ns"]) > 0
    assert {int(b["batch_size"]) for b in stats["batch_stats"]} <= {1, 2, 3, 4, 5, 6} and int(stats["last_inference"]) > 0
    assert seen["statistics_all"] == ["digits"]
    assert seen["statistics_missing"].startswith("StatusCode.NOT_FOUND: ")


def test_load_with_a_config_changes_the_serving_settings_until_the_next_load(seen):
    loaded = seen["config_loaded"]
    assert loaded["max_batch_size"] == 8
    assert loaded["dynamic_batching"] == {"preferred_batch_size": [4], "max_queue_delay_microseconds": "100"}
    assert loaded["instance_group"][0]["count"] == 2
    assert seen["config_after_refusals"] == loaded  # refused loads changed nothing
    assert seen["config_reloaded"] == seen["config"]
    for key, text in [
        ("config_unknown", "sequence_batching"),
        ("config_bad_value", "max_batch_size must be >= 0"),
        ("config_bad_json", "not valid JSON"),
        ("config_files", "file:1/model.onnx"),
    ]:
        assert seen[key].startswith("StatusCode.INVALID_ARGUMENT: ") and text in seen[key], seen[key]


def test_unloading_a_model_that_is_not_loaded_succeeds(seen):
    assert seen["unload_again"] is None
    assert seen["unload_missing"].startswith("StatusCode.NOT_FOUND: ")


def test_class_count_answers_top_k_as_triton(seen, digits):
    expected = logits(digits, digits.x_test[:2])
    for row, answer in zip(expected, seen["classes"]):
        top = np.argsort(-row)[:3]
        assert answer == [f"{row[i]:f}:{i}" for i in top]
    assert seen["classes_too_many"].startswith("StatusCode.INVALID_ARGUMENT: ") and "class_count 11" in seen["classes_too_many"]


def test_log_settings_read_and_change(seen):
    before = seen["log_before"]["settings"]
    assert before["log_file"] == {"string_param": ""} and before["log_format"] == {"string_param": "default"}
    after = seen["log_updated"]["settings"]
    assert after["log_verbose_level"] == {"uint32_param": 1} and after["log_format"] == {"string_param": "ISO8601"}
    assert seen["log_bad"].startswith("StatusCode.INVALID_ARGUMENT: ") and "log_colour" in seen["log_bad"]


def test_trace_settings_read_and_change_per_model_and_globally(seen):
    value = lambda answer, key: answer["settings"][key].get("value")  # noqa: E731
    assert value(seen["trace"], "trace_level") == ["OFF"] and value(seen["trace"], "trace_rate") == ["1000"]
    assert value(seen["trace_model"], "trace_level") == ["TIMESTAMPS"] and value(seen["trace_model"], "trace_rate") == ["5"]
    # cleared: the model's rate follows the server's again; the level it set stays its own
    assert value(seen["trace_cleared"], "trace_rate") == ["1000"] and value(seen["trace_cleared"], "trace_level") == ["TIMESTAMPS"]
    assert seen["trace_bad"].startswith("StatusCode.INVALID_ARGUMENT: ") and "trace_rate must be an integer >= 1" in seen["trace_bad"]


def test_cuda_shared_memory_lists_none_unregisters_nothing_and_refuses_a_region(seen):
    assert seen["cuda_shm_status"] == {} and seen["cuda_shm_unregister"] is None
    assert seen["cuda_shm_register"].startswith("StatusCode.UNIMPLEMENTED: ") and "system shared memory only" in seen["cuda_shm_register"]


def test_system_shared_memory_inputs_and_outputs(seen, digits):
    assert seen["shm_status"] == ["in_data", "out_data"]
    assert seen["shm_output_shape"] == [4, 10]
    np.testing.assert_allclose(seen["shm_logits"], logits(digits, digits.x_test[:4]), rtol=1e-4, atol=1e-4)
    for key, text in [
        ("shm_missing_key", "cannot be opened"),
        ("shm_too_big", "exceeds"),
        ("shm_traversal", "not a POSIX"),
        ("shm_output_too_small", "needs 160 bytes"),
        ("shm_input_past_region", "exceeds its"),
        ("shm_unregistered", "not registered"),
    ]:
        assert seen[key].startswith("StatusCode.INVALID_ARGUMENT: ") and text in seen[key], (key, seen[key])
    assert seen["shm_duplicate"].startswith("StatusCode.ALREADY_EXISTS: ")
    assert seen["shm_status_after"] == {} and seen["server_live"]
