"""Padding-free serving: trailing padding cut before compute, sequence outputs padded back, similar lengths batched
together, anything else (left padding, a model that reads its padding, a fixed length) served as sent."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from slimserve.optimizer.formats.sequence_axis import relative_difference, trailing_lengths
from slimserve.server.batching.batcher import DynamicBatcher
from slimserve.server.batching.sequence import SequencePlan, plan_for, verify
from slimserve.server.errors import InvalidArgument
from slimserve.server.runtimes import TensorSpec, create_runtime
from tests.token_models import token_model, token_rows


def loaded(path):
    runtime = create_runtime("onnxruntime", path)
    runtime.load()
    return runtime


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def test_trailing_lengths_accepts_only_ones_then_zeros():
    assert trailing_lengths(np.array([[1, 1, 0, 0], [1, 0, 0, 0]])).tolist() == [2, 1]
    assert trailing_lengths(np.array([[1, 1, 1, 1]], dtype=bool)).tolist() == [4]
    assert trailing_lengths(np.array([[0, 1, 1, 0]])) is None  # left padding
    assert trailing_lengths(np.array([[1, 0, 1, 0]])) is None  # a hole
    assert trailing_lengths(np.array([[1, 2, 0, 0]])) is None  # not 0/1
    assert trailing_lengths(np.array([[1, 1, 0, 0], [0, 0, 0, 0]])) is None  # a row without a token


def test_detected_by_name_and_refused_when_declared_wrong():
    ids, mask = TensorSpec("input_ids", "INT64", (-1, -1)), TensorSpec("attention_mask", "INT64", (-1, -1))
    outputs = [TensorSpec("hidden", "FP32", (-1, -1, 16)), TensorSpec("pooled", "FP32", (-1, 16))]
    plan = plan_for([ids, mask], outputs)
    assert plan == SequencePlan(("input_ids", "attention_mask"), "attention_mask", ("hidden",))
    assert plan_for([TensorSpec("input_ids", "INT64", (-1, 128)), TensorSpec("attention_mask", "INT64", (-1, 128))], outputs) is None
    assert plan_for([TensorSpec("input_ids", "FP32", (-1, -1)), mask], outputs) is None  # detected but unfit: padded
    assert plan_for([ids], outputs) is None  # no mask
    images = TensorSpec("tokens", "INT64", (-1, -1, 3))
    with pytest.raises(InvalidArgument, match=r"input 'tokens' is INT64 \[-1,-1,3\], not INT64 \[batch, seq\]"):
        plan_for([images, mask], outputs, {"inputs": ["tokens", "attention_mask"], "mask": "attention_mask"})
    with pytest.raises(InvalidArgument, match="no input 'ids'"):
        plan_for([ids, mask], outputs, {"inputs": ["ids", "attention_mask"], "mask": "attention_mask"})
    with pytest.raises(InvalidArgument, match="must be one of the declared"):
        plan_for([ids, mask], outputs, {"inputs": ["input_ids"], "mask": "attention_mask"})
    declared = plan_for(
        [TensorSpec("tok", "INT64", (-1, -1)), TensorSpec("m", "INT64", (-1, -1))], outputs, {"inputs": ["tok", "m"], "mask": "m"}
    )
    assert declared is not None and declared.mask == "m"


def test_cut_keeps_the_bucket_and_pads_outputs_back(tmp_path):
    runtime = loaded(token_model(tmp_path / "t.onnx", token_types=True))
    plan = plan_for(runtime.inputs, runtime.outputs)
    assert plan is not None and plan.outputs == ("hidden",)
    rows = token_rows([5, 11, 3], 128, token_types=True)
    trimmed, full, keep = plan.cut(rows)
    assert (full, keep) == (128, 16) and all(trimmed[n].shape == (3, 16) for n in plan.inputs)
    padded = runtime.predict(rows)
    served = plan.pad_back(runtime.predict(trimmed), full, keep)
    assert served["hidden"].shape == padded["hidden"].shape == (3, 128, 16)
    assert cosine(served["pooled"], padded["pooled"]) >= 0.9999
    for i, n in enumerate([5, 11, 3]):  # the real positions agree; the padded ones are zeros
        assert relative_difference(padded["hidden"][i, :n], served["hidden"][i, :n]) < 1e-5
        assert not served["hidden"][i, keep:].any()
    assert verify(runtime.predict, plan) == ""
    left = {k: v[:, ::-1].copy() for k, v in rows.items()}  # left padding: served as sent
    assert plan.cut(left) is None


def test_a_model_that_reads_its_padding_fails_verification(tmp_path):
    runtime = loaded(token_model(tmp_path / "bad.onnx", reads_padding=True))
    plan = plan_for(runtime.inputs, runtime.outputs)
    assert "output 'pooled' differs by" in verify(runtime.predict, plan)


def test_batcher_runs_each_request_at_its_length_and_groups_similar_lengths():
    seen: list[tuple[int, int]] = []

    def predict(inputs, outputs):
        ids = inputs["input_ids"]
        seen.append(ids.shape)
        return {"hidden": np.ones((*ids.shape, 2), np.float32), "pooled": np.ones((len(ids), 2), np.float32)}

    plan = SequencePlan(("input_ids", "attention_mask"), "attention_mask", ("hidden",))

    async def run():
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(predict, pool, max_concurrency=1, sequence=plan)
            requests = [token_rows([n], 128, seed=i) for i, n in enumerate([30, 5, 7, 29, 3])]
            answers = await asyncio.gather(*(batcher.submit(r) for r in requests))
            await batcher.close()
            return answers

    answers = asyncio.run(run())
    assert all(a["hidden"].shape == (1, 128, 2) and a["pooled"].shape == (1, 2) for a in answers)
    assert answers[0]["hidden"][0, :32].all() and not answers[0]["hidden"][0, 32:].any()
    # the two ~30-token requests merge at 32 positions, the three short ones at 8: no batch padded to its longest member
    assert seen == [(2, 32), (3, 8)]


def test_served_padding_free_over_grpc(server_factory, tmp_path):
    from slimserve.client.client import SlimServeClient

    server = server_factory()
    path = token_model(tmp_path / "text.onnx")
    with SlimServeClient(server.address) as client:
        client.register("text", path)
        plan = server.server.dataplane.loader.sequences.get(("text", "baseline"))
        assert plan is not None and plan.mask == "attention_mask"
        rows = token_rows([7, 20], 128)
        _, out = client.infer("text", rows)
    full = loaded(path).predict(rows)
    assert out["hidden"].shape == (2, 128, 16)
    assert cosine(out["pooled"], full["pooled"]) >= 0.9999
    assert relative_difference(full["hidden"][1, :20], out["hidden"][1, :20]) < 1e-5


def test_a_model_reading_its_padding_is_served_padded(server_factory, tmp_path):
    from slimserve.client.client import SlimServeClient

    server = server_factory()
    path = token_model(tmp_path / "reads.onnx", reads_padding=True)
    with SlimServeClient(server.address) as client:
        client.register("reads", path)
        assert ("reads", "baseline") not in server.server.dataplane.loader.sequences
        rows = token_rows([7], 128)
        _, out = client.infer("reads", rows)
    np.testing.assert_allclose(out["pooled"], loaded(path).predict(rows)["pooled"], rtol=1e-5, atol=1e-6)


def test_a_declared_sequence_is_checked_at_register_and_served_padding_free(server_factory, tmp_path):
    from slimserve.client.client import SlimServeClient
    from slimserve.client.transport import SlimServeClientError

    server = server_factory()
    path = token_model(tmp_path / "text.onnx")
    good = token_rows([4, 9], 32)
    np.savez(tmp_path / "eval.npz", **good)
    left = {k: v[:, ::-1].copy() for k, v in good.items()}
    np.savez(tmp_path / "left.npz", **left)
    with SlimServeClient(server.address) as client:
        with pytest.raises(SlimServeClientError, match=r"sequence declaration refused: the model has no input 'hidden_state'"):
            client.register("t1", path, sequence_inputs=["hidden_state", "attention_mask"])
        with pytest.raises(SlimServeClientError, match=r"row 0 of 'attention_mask' is not trailing padding"):
            client.register("t2", path, data=tmp_path / "left.npz", sequence_inputs=["input_ids", "attention_mask"])
        assert [m["name"] for m in client.models()] == []  # nothing half registered
        client.register(
            "t3", path, data=tmp_path / "eval.npz", sequence_inputs=["input_ids", "attention_mask"], attention_mask="attention_mask"
        )
        assert server.server.repository.get("t3").sequence == {"inputs": ["input_ids", "attention_mask"], "mask": "attention_mask"}
        assert ("t3", "baseline") in server.server.dataplane.loader.sequences


def test_a_declared_input_that_is_not_batch_by_seq_is_refused_with_its_shape(server_factory, tmp_path):
    from slimserve.client.client import SlimServeClient
    from slimserve.client.transport import SlimServeClientError
    from tests.conftest import make_echo_onnx

    server = server_factory()
    path = make_echo_onnx(tmp_path / "echo.onnx", ["FP32"])
    with SlimServeClient(server.address) as client:
        with pytest.raises(
            SlimServeClientError, match=r"sequence declaration refused: input 'in_fp32' is FP32 \[-1,3\], not INT64 \[batch, seq\]"
        ):
            client.register("echo", path, sequence_inputs=["in_fp32"], attention_mask="in_fp32")
        assert client.models() == []


def test_dynamic_int8_is_cut_within_its_own_noise_and_a_padding_reader_is_not(tmp_path):
    from slimserve.optimizer.base import Artifact, PassContext
    from slimserve.optimizer.catalog import make_pass
    from slimserve.server.batching.sequence import quantizes_per_call

    context = PassContext(workdir=tmp_path / "work")
    int8 = make_pass("quantize-dynamic").run(Artifact(token_model(tmp_path / "t.onnx"), "onnx"), context)
    assert quantizes_per_call(int8.path) and not quantizes_per_call(tmp_path / "t.onnx")
    runtime = loaded(int8.path)
    plan = plan_for(runtime.inputs, runtime.outputs)
    assert verify(runtime.predict, plan, quantized=True) == ""
    reads = loaded(token_model(tmp_path / "reads.onnx", reads_padding=True))
    assert "keeps a cosine of only" in verify(reads.predict, plan_for(reads.inputs, reads.outputs), quantized=True)


def test_a_fixed_length_export_is_served_padding_free_as_registered(server_factory, tmp_path):
    from slimserve.client.client import SlimServeClient

    server = server_factory()
    path = token_model(tmp_path / "fixed.onnx", seq=32)
    with SlimServeClient(server.address) as client:
        client.register("fixed", path)
        assert ("fixed", "baseline") in server.server.dataplane.loader.sequences
        runtime = server.server.dataplane.loader.models["fixed"].variants["baseline"].runtime
        assert "take any length (was 32" in runtime.any_length
        rows = token_rows([5, 13], 32)
        _, out = client.infer("fixed", rows)
    full = loaded(path).predict(rows)
    assert out["hidden"].shape == (2, 32, 16)
    np.testing.assert_allclose(out["pooled"], full["pooled"], rtol=1e-4, atol=1e-5)
    reads = loaded(token_model(tmp_path / "reads.onnx", seq=32, reads_padding=True))
    assert reads.any_length == "" and reads.inputs[0].shape == (-1, 32)  # refused by the exact check: served as is


def test_a_model_with_other_inputs_beside_the_mask_is_loaded_as_it_is(tmp_path):
    from tests.optimizer.onnx_builders import attention_data, attention_model

    runtime = loaded(attention_model(tmp_path / "attn.onnx"))  # x FP32 [N,16,32] and attention_mask INT64 [N,16]
    assert runtime.any_length == "" and runtime.inputs[1].shape == (-1, 16)
    assert runtime.predict(attention_data(2, 0))["logits"].shape == (2, 4)
