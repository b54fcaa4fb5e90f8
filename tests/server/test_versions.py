"""Triton's integer model versions: 1 = the baseline, then in order of creation, never reused; they pin like names."""

from __future__ import annotations

import json

import pytest

from slimserve.server.errors import NotFound
from slimserve.server.store.manifest import ModelInfo, VariantInfo
from tests.server.test_control import add_copy, control_of, infer, register, run


def variant(name: str, created_at: str, version: int = 0) -> VariantInfo:
    return VariantInfo(name, recipe="", parent="", runtime="onnxruntime", format="onnx", created_at=created_at, version=version)


def model(*variants: VariantInfo) -> ModelInfo:
    return ModelInfo("m", "onnx", "", "2024-01-01", [], [], [], {v.name: v for v in variants})


def test_old_manifests_get_versions_in_creation_order_baseline_first():
    info = model(variant("quant", "2024-01-03"), variant("pruned", "2024-01-02"), variant("baseline", "2024-01-05"))
    assert {n: v.version for n, v in info.variants.items()} == {"baseline": 1, "pruned": 2, "quant": 3}
    d = info.to_dict()
    for v in d["variants"].values():
        del v["version"]
    del d["last_version"]
    again = ModelInfo.from_dict(json.loads(json.dumps(d)))
    assert {n: v.version for n, v in again.variants.items()} == {"baseline": 1, "pruned": 2, "quant": 3}


def test_a_deleted_variants_version_is_never_reused_and_survives_the_manifest():
    info = model(variant("baseline", "2024-01-01"), variant("a", "2024-01-02"), variant("b", "2024-01-03"))
    del info.variants["b"]
    info = ModelInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    info.add_variant(variant("c", "2024-01-04", version=7))  # whatever it carried, a new variant takes the next number
    assert {n: v.version for n, v in info.variants.items()} == {"baseline": 1, "a": 2, "c": 4}
    assert info.variant_named("4") == "c" and info.variant_named("c") == "c" and info.variant_named("3") == "3"


def test_versions_pin_requests_like_names_and_a_missing_one_is_not_found(tmp_path, digits):
    async def scenario():
        async with control_of(tmp_path) as control:
            await register(control, "digits", digits.onnx)
            await add_copy(control, "digits", "copy", digits.onnx)
            x = digits.x_test[:1]
            assert await infer(control, x, "1") == "baseline" and await infer(control, x, "2") == "copy"
            assert await infer(control, x, "copy") == "copy"
            assert control.dataplane.metadata("digits", "2").versions == ["1", "2", "baseline", "copy"]
            assert [(e.variant, e.version) for e in control.repository_index()] == [("baseline", 1), ("copy", 2)]
            with pytest.raises(NotFound, match=r"no variant '3' \(variants: baseline \(version 1\), copy \(version 2\)\)"):
                await infer(control, x, "3")
            await control.delete_variant("digits", "copy")
            await add_copy(control, "digits", "again", digits.onnx)
            assert control.get_model("digits").variants["again"].version == 3
            assert control.dataplane.is_ready("digits", "3") and not control.dataplane.is_ready("digits", "2")

    run(scenario())
