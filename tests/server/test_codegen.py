"""The generated code is fresh, imports under Triton's oldest protobuf, and matches Triton's wire format."""

import importlib.util
import shutil
import subprocess
import sys

from tests.servers import ROOT


def load_generate():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checked_in_code_is_fresh():
    out = subprocess.run([sys.executable, "proto/generate.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_check_fails_when_a_proto_changes(tmp_path, monkeypatch):
    gen = load_generate()
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    proto = tmp_path / "proto" / "carddeck" / "v1" / "carddeck.proto"
    proto.write_text(proto.read_text().replace("bool per_sample = 3;", "bool per_sample = 9;", 1))
    monkeypatch.setattr(gen, "PROTO_DIR", tmp_path / "proto")
    problems = gen.check()
    assert any("carddeck_pb2.py is stale" in p for p in problems), problems


def test_gencode_needs_no_newer_protobuf_than_tritonclient_accepts():
    gen = load_generate()
    for proto in gen.PROTOS:
        version = gen._gencode_version(gen.OUT_DIR / proto.replace(".proto", "_pb2.py"))
        assert version <= (6, 30, 0), (proto, version)


def _fields(descriptor):
    out = {}
    for msg in descriptor.message_types_by_name.values():
        stack = [msg]
        while stack:
            m = stack.pop()
            stack.extend(m.nested_types)
            out[m.full_name] = {f.name: (f.number, f.type, f.is_repeated if hasattr(f, "is_repeated") else f.label == 3)
                                for f in m.fields}  # fmt: skip
    return out


def test_oip_messages_match_tritons_wire_format():
    from tritonclient.grpc import model_config_pb2 as triton_mc
    from tritonclient.grpc import service_pb2 as triton

    from carddeck.wire.proto_gen.inference import grpc_service_pb2 as ours
    from carddeck.wire.proto_gen.inference import model_config_pb2 as ours_mc

    for mine, theirs in ((ours, triton), (ours_mc, triton_mc)):
        a, b = _fields(mine.DESCRIPTOR), _fields(theirs.DESCRIPTOR)
        for name, fields in a.items():
            assert name in b, f"{name} is not a Triton message"
            for field, spec in fields.items():
                assert b[name].get(field) == spec, f"{name}.{field}: ours {spec}, Triton {b[name].get(field)}"
    ours_service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs_service = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in ours_service.methods:
        other = theirs_service.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name
        assert method.output_type.full_name == other.output_type.full_name
    enum_ours = {v.name: v.number for v in ours_mc.DESCRIPTOR.enum_types_by_name["DataType"].values}
    enum_theirs = {v.name: v.number for v in triton_mc.DESCRIPTOR.enum_types_by_name["DataType"].values}
    assert enum_ours.items() <= enum_theirs.items()
