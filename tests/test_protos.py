"""The generated modules are current, and the inference proto is wire-compatible with Triton's client."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from slimserve.protos import generate, inference_pb2, model_config_pb2

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current():
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_bytes() for p in generate.generate(Path(tmp))}
    committed = {p.name: p.read_bytes() for p in (ROOT / "protos").glob("*_pb2*.py*")}
    stale = sorted(name for name in fresh if committed.get(name) != fresh[name])
    assert set(committed) == set(fresh), f"generated files differ: {sorted(set(committed) ^ set(fresh))}"
    assert not stale, f"{', '.join(stale)} are stale: run `make proto` and commit the result"


# tritonclient registers its own copy of package `inference`; both cannot live in one process
# (protobuf refuses duplicate symbols), so its descriptors are read in a subprocess.
DUMP = """
import json
from tritonclient.grpc import model_config_pb2, service_pb2
def fields(d):
    out = {}
    for m in d.message_types_by_name.values():
        stack = [m]
        while stack:
            m = stack.pop()
            out[m.full_name] = {f.name: [f.number, f.type, f.is_repeated] for f in m.fields}
            stack.extend(m.nested_types)
    return out
svc = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
enums = {e.full_name: {v.name: v.number for v in e.values} for e in model_config_pb2.DESCRIPTOR.enum_types_by_name.values()}
for m in model_config_pb2.DESCRIPTOR.message_types_by_name.values():
    enums.update({e.full_name: {v.name: v.number for v in e.values} for e in m.enum_types})
print(json.dumps({"messages": {**fields(service_pb2.DESCRIPTOR), **fields(model_config_pb2.DESCRIPTOR)}, "enums": enums,
                  "methods": {m.name: [m.input_type.full_name, m.output_type.full_name] for m in svc.methods}}))
"""


def ours():
    out = {}
    for m in [*inference_pb2.DESCRIPTOR.message_types_by_name.values(), *model_config_pb2.DESCRIPTOR.message_types_by_name.values()]:
        stack = [m]
        while stack:
            m = stack.pop()
            out[m.full_name] = {f.name: [f.number, f.type, f.is_repeated] for f in m.fields}
            stack.extend(m.nested_types)
    return out


def test_wire_compatible_with_tritonclient():
    theirs = json.loads(subprocess.run([sys.executable, "-c", DUMP], check=True, capture_output=True, text=True).stdout)
    mine = ours()
    for message, fields in mine.items():
        assert message in theirs["messages"], f"{message} is not in Triton's proto"
        for name, spec in fields.items():
            assert theirs["messages"][message].get(name) == spec, (
                f"{message}.{name}: ours {spec}, Triton's {theirs['messages'][message].get(name)}"
            )
    mine_enums = {e.full_name: {v.name: v.number for v in e.values} for e in model_config_pb2.DESCRIPTOR.enum_types_by_name.values()}
    for m in model_config_pb2.DESCRIPTOR.message_types_by_name.values():
        mine_enums.update({e.full_name: {v.name: v.number for v in e.values} for e in m.enum_types})
    for enum, values in mine_enums.items():
        assert values.items() <= theirs["enums"][enum].items(), f"{enum}: ours {values}, Triton's {theirs['enums'][enum]}"
    svc = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert svc.full_name == "inference.GRPCInferenceService"
    for method in svc.methods:
        assert theirs["methods"][method.name] == [method.input_type.full_name, method.output_type.full_name]


def test_protobuf_parses_with_its_c_implementation():
    """The serving path parses and serializes every request: it must not run protobuf's pure-Python code."""
    from slimserve.server.app import protobuf_backend

    assert protobuf_backend() == "upb"


def test_a_pure_python_protobuf_is_warned_about(monkeypatch, caplog):
    import logging

    from slimserve.server import app

    monkeypatch.setattr(app, "protobuf_backend", lambda: "python")
    with caplog.at_level(logging.WARNING, logger="slimserve.server.app"):
        app.warn_if_slow_protobuf()
    assert "pure-Python implementation" in caplog.text
