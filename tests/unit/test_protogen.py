"""The committed spendgate.v1 stubs are exactly what proto/ generates."""

from __future__ import annotations

from pathlib import Path

from spendgate import protogen

COMMITTED = protogen.ROOT / "spendgate" / "v1"


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def proto_stems() -> list[str]:
    return [p.stem for p in protogen.proto_files()]


def test_every_proto_is_found() -> None:
    names = [p.relative_to(protogen.PROTO_DIR).as_posix() for p in protogen.proto_files()]
    assert names == sorted(names)
    assert {"spendgate/v1/budget.proto", "spendgate/v1/dataplane.proto"} <= set(names)
    assert all(n.startswith("spendgate/v1/") for n in names)


def test_committed_stubs_match_generated(tmp_path: Path) -> None:
    protogen.generate(tmp_path)
    # protoc writes into the package folders of the .proto files and nowhere else.
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "spendgate",
        "spendgate/v1",
        *sorted(f"spendgate/v1/{name}" for name in files_under(tmp_path / "spendgate" / "v1")),
    ]
    generated = files_under(tmp_path / "spendgate" / "v1")
    committed = files_under(COMMITTED)
    assert sorted(committed) == sorted(generated), "stub files missing or extra: run `make proto`"
    stale = sorted(name for name in generated if generated[name] != committed[name])
    assert stale == [], f"stale stubs (run `make proto`): {stale}"
    # Each .proto gives exactly its message module, type stubs and gRPC module.
    assert sorted(generated) == sorted(
        ["__init__.py"]
        + [
            f"{stem}{suffix}"
            for stem in proto_stems()
            for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
        ]
    )


def test_generate_keeps_an_existing_init(tmp_path: Path) -> None:
    init = tmp_path / "spendgate" / "v1" / "__init__.py"
    init.parent.mkdir(parents=True)
    init.write_text("# mine\n")
    protogen.generate(tmp_path)
    assert init.read_text() == "# mine\n"
