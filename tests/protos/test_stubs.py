"""The committed gRPC stubs are exactly what `make proto` generates from the .proto file."""

from __future__ import annotations

import shutil
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[2]
GENERATED = ("npuserve_pb2.py", "npuserve_pb2.pyi", "npuserve_pb2_grpc.py")


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    (tmp_path / "protos").mkdir()
    shutil.copy(REPO / "protos" / "npuserve.proto", tmp_path / "protos")
    code = protoc.main(["grpc_tools.protoc", "-I", str(tmp_path), f"--python_out={tmp_path}",
                        f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                        str(tmp_path / "protos" / "npuserve.proto")])
    assert code == 0
    for name in GENERATED:
        fresh = (tmp_path / "protos" / name).read_text()
        committed = (REPO / "protos" / name).read_text()
        assert fresh == committed, f"protos/{name} is stale: run `make proto` and commit it"
