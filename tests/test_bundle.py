"""Run bundles: round trip, and every hostile shape a zip can take is refused with nothing left behind."""
from __future__ import annotations

import io
import json
import stat
import zipfile

import pandas as pd
import pytest

from analysis.store.bundle import (MANIFEST, OPTIONAL_RUN_FILES, RUN_FILES, BundleError, BundleLimits, open_bundle,
                                   write_bundle)
from analysis.cli.main import main
from analysis.store.run import TABLES


@pytest.fixture(scope="module")
def bundle_bytes(digits_run, tmp_path_factory) -> bytes:
    return write_bundle(digits_run.path, tmp_path_factory.mktemp("b") / "digits.qlrun").read_bytes()


def members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def rezip(files: dict[str, bytes], extra: list[tuple[zipfile.ZipInfo | str, bytes]] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for info, data in extra:
            zf.writestr(info, data)
    return buf.getvalue()


def refused(data, tmp_path, match: str, **kw):
    dest = tmp_path / "out"
    with pytest.raises(BundleError, match=match):
        open_bundle(data, dest, **kw)
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_round_trip(digits_run, bundle_bytes, tmp_path):
    assert sorted(members(bundle_bytes)) == sorted([MANIFEST, *RUN_FILES, *OPTIONAL_RUN_FILES])  # no jobs/, no model
    for source in (bundle_bytes, io.BytesIO(bundle_bytes)):
        dest = tmp_path / f"run{id(source)}"
        run = open_bundle(source, dest)
        assert run.path == dest and run.meta == digits_run.meta
        for t in TABLES:
            pd.testing.assert_frame_equal(run.tables[t], digits_run.tables[t])
    (tmp_path / "f.qlrun").write_bytes(bundle_bytes)
    assert open_bundle(tmp_path / "f.qlrun", tmp_path / "empty_dir_ok").layer_names == digits_run.layer_names


def test_with_model_carries_safetensors_only(digits_run, tmp_path, monkeypatch):
    from analysis.store.run import write_run

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    meta = {**digits_run.meta, "model": {**digits_run.meta["model"], "source": str(weights)}}
    run = write_run(tmp_path / "run", meta, digits_run.tables)
    b = write_bundle(run.path, tmp_path / "m.qlrun", with_model=True)
    assert "model/w.safetensors" in members(b.read_bytes())
    back = open_bundle(b, tmp_path / "back")
    assert (back.path / "model" / "w.safetensors").read_bytes() == weights.read_bytes()
    pickled = tmp_path / "w.pt"
    pickled.write_bytes(b"not really")
    meta["model"] = {**meta["model"], "source": str(pickled)}
    run2 = write_run(tmp_path / "run2", meta, digits_run.tables)
    with pytest.raises(BundleError, match="no pickled weights"):
        write_bundle(run2.path, tmp_path / "p.qlrun", with_model=True)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../run.json", "..\\run.json", "C:/x.json"])
def test_path_traversal_is_refused(bundle_bytes, tmp_path, name):
    refused(rezip(members(bundle_bytes), [(name, b"x")]), tmp_path, "unsafe path")


@pytest.mark.parametrize("name", ["notes.txt", "jobs/abc.json", "model/w.pt", "model/", "model/.hidden.onnx",
                                  "layers.parquet.bak"])
def test_unknown_names_are_refused(bundle_bytes, tmp_path, name):
    refused(rezip(members(bundle_bytes), [(name, b"x")]), tmp_path, "unknown member")


def test_symlink_member_is_refused(bundle_bytes, tmp_path):
    info = zipfile.ZipInfo("model/w.onnx")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    refused(rezip(members(bundle_bytes), [(info, b"/etc/passwd")]), tmp_path, "symbolic link")


def test_zip_bomb_declared_size(bundle_bytes, tmp_path):
    files = members(bundle_bytes)
    files["layers.parquet"] = b"\0" * (8 << 20)  # 8 MiB of zeros: a few kB compressed
    refused(rezip(files), tmp_path, "declares 8,388,608 bytes", limits=BundleLimits(max_table_bytes=1 << 20))


def test_zip_bomb_lying_about_its_size(bundle_bytes, tmp_path):
    """Headers that declare a small size over a large payload: extraction stops at the declared size."""
    files = members(bundle_bytes)
    payload = b"\0" * (4 << 20)
    files["layers.parquet"] = payload
    data = bytearray(rezip(files))
    small = (100).to_bytes(4, "little")
    real = len(payload).to_bytes(4, "little")
    # patch the uncompressed size in the local header and the central directory entry of layers.parquet
    name = b"layers.parquet"
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (i := data.find(sig, start)) >= 0:
            name_at = i + (30 if sig == b"PK\x03\x04" else 46)
            if data[name_at:name_at + len(name)] == name:
                assert data[i + off:i + off + 4] == real
                data[i + off:i + off + 4] = small
            start = i + 4
    refused(bytes(data), tmp_path, "layers.parquet")


def test_too_many_members(bundle_bytes, tmp_path):
    extra = [(f"model/w{i}.onnx", b"x") for i in range(20)]
    refused(rezip(members(bundle_bytes), extra), tmp_path, "at most 16")


def test_total_size_limit(bundle_bytes, tmp_path):
    refused(bundle_bytes, tmp_path, "bytes uncompressed", limits=BundleLimits(max_total_bytes=1000))


@pytest.mark.parametrize("data", [b"", b"not a zip at all", b"PK\x03\x04garbage"])
def test_not_a_zip(data, tmp_path):
    refused(data, tmp_path, "not a zip file")


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_missing_or_tampered_members(bundle_bytes, tmp_path):
    files = members(bundle_bytes)
    refused(rezip({k: v for k, v in files.items() if k != "cost.parquet"}), tmp_path, "missing cost.parquet")
    files2 = {**files, "run.json": files["run.json"].replace(b'"status": "complete"', b'"status": "partial"')}
    refused(rezip(files2), tmp_path, "does not match its sha256")
    manifest = json.loads(files[MANIFEST])
    manifest["schema"] = "quantlens.bundle/9"
    refused(rezip({**files, MANIFEST: json.dumps(manifest).encode()}), tmp_path, "quantlens.bundle/1")
    refused(rezip(files, [("run.json", b"{}")]), tmp_path, "appears twice")


def test_unreadable_run_inside(bundle_bytes, tmp_path):
    files = members(bundle_bytes)
    bad = b"PAR1 not parquet"
    files["sensitivity.parquet"] = bad
    manifest = json.loads(files[MANIFEST])
    import hashlib

    manifest["files"]["sensitivity.parquet"] = {"bytes": len(bad), "sha256": hashlib.sha256(bad).hexdigest()}
    files[MANIFEST] = json.dumps(manifest).encode()
    refused(rezip(files), tmp_path, "does not load")


def test_dest_must_be_empty(bundle_bytes, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="not an empty folder"):
        open_bundle(bundle_bytes, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_cli_bundle(digits_run, tmp_path, capsys):
    out = tmp_path / "d.qlrun"
    assert main(["bundle", str(digits_run.path), "--out", str(out)]) == 0
    assert open_bundle(out, tmp_path / "back").meta == digits_run.meta
    assert main(["bundle", str(tmp_path / "nope"), "--out", str(tmp_path / "x.qlrun")]) == 2
    assert main(["bundle", str(digits_run.path), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
