"""The checked-in generated code is what protos/generate.py produces from the .proto files."""
import importlib.util
from pathlib import Path

import pytest

PROTOS = Path(__file__).resolve().parents[1] / "protos"


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools not installed")
def test_regenerating_gives_identical_files(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", PROTOS / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    written = generate.generate(tmp_path)
    assert {p.name for p in written} == {p.name for p in PROTOS.glob("*_pb2*.py")}
    for path in written:
        assert path.read_bytes() == (PROTOS / path.name).read_bytes(), f"{path.name} is stale: run python protos/generate.py"


def test_generated_code_imports_through_the_package():
    from asyncps.protos import chief_pb2_grpc, ps_pb2, ps_pb2_grpc

    assert ps_pb2.PushChunk.DESCRIPTOR.fields_by_name["tensors"].message_type.full_name == "asyncps.Tensor"
    assert hasattr(ps_pb2_grpc, "ParameterServerStub") and hasattr(chief_pb2_grpc, "ChiefStub")


def test_rpc_method_table_matches_the_proto():
    from asyncps.protos import ps_pb2
    from asyncps.protos.rpc import PS_METHODS, WIRE

    service = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"]
    assert set(PS_METHODS) == {m.name for m in service.methods}
    for m in service.methods:
        kind, request, reply = PS_METHODS[m.name]
        want = f"{'stream' if m.client_streaming else 'unary'}_{'stream' if m.server_streaming else 'unary'}"
        assert kind == want, m.name
        for cls, descriptor in ((request, m.input_type), (reply, m.output_type)):
            if cls is WIRE:  # carried as codec wire bytes: a header in field 1, tensors in field 2
                assert descriptor.fields_by_number[2].message_type.full_name == "asyncps.Tensor"
                assert descriptor.name == "InitChunk" or descriptor.fields_by_number[1].name == "header"
            else:
                assert cls.DESCRIPTOR.full_name == descriptor.full_name
