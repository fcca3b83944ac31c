"""Run bundles: one ``.qlrun`` file (a zip) that carries a Run to a teammate.

A bundle holds ``bundle.json`` (a manifest: schema, each member's size and sha256),
``run.json`` and the Run's Parquet tables (``channels.parquet`` when the Run has it), and with
``with_model`` the model file(s) under ``model/`` (``.onnx``, ``.onnx.data``, ``.safetensors`` only: no pickle). The
sweep's ``jobs/`` records are left out: they are the resume cache of a sweep, every
result in them is already in the tables, and resuming needs the model, the data and
the paths of the machine that ran it.

Opening a bundle trusts nothing in it: only the names above, no paths of any other
shape (``../x``, ``/abs``, ``a\\b``, links, folders), at most ``max_members`` members,
declared sizes checked before anything is written and actual sizes counted while
extracting (a zip bomb stops at its limit), each member checked against the manifest's
sha256, and the Run read back with :func:`analysis.store.run.load_run` (JSON and Parquet only).
Extraction goes to a staging folder that is renamed into place, so ``dest`` holds a whole
Run or nothing.

Example:
    >>> write_bundle("runs/digits", "digits.qlrun")
    >>> run = open_bundle("digits.qlrun", "/tmp/digits")
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from analysis.store.atomic import atomic_path
from analysis.store.run import OPTIONAL_TABLES, TABLES, Run, RunError, load_run
from analysis.errors import InputError

BUNDLE_SCHEMA = "quantlens.bundle/1"
MANIFEST = "bundle.json"
RUN_FILES = ("run.json", *(f"{t}.parquet" for t in TABLES))
OPTIONAL_RUN_FILES = tuple(f"{t}.parquet" for t in OPTIONAL_TABLES)  # carried when the Run has them
MODEL_DIR = "model"
MODEL_SUFFIXES = (".onnx", ".onnx.data", ".safetensors")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CHUNK = 1 << 20
MiB = 1 << 20


class BundleError(InputError):
    """A bundle that cannot be written or opened; the message names the file and the member."""


@dataclass(frozen=True)
class BundleLimits:
    """What an opened bundle may hold (bytes are uncompressed sizes)."""

    max_members: int = 16
    max_json_bytes: int = 16 * MiB  # run.json, bundle.json
    max_table_bytes: int = 512 * MiB  # each Parquet table
    max_model_bytes: int = 4096 * MiB  # each model file
    max_total_bytes: int = 8192 * MiB


def _is_model_member(name: str) -> bool:
    head, _, base = name.partition("/")
    return head == MODEL_DIR and bool(_MODEL_NAME.match(base)) and base.endswith(MODEL_SUFFIXES)


def _member_limit(name: str, limits: BundleLimits) -> int:
    if name.endswith(".json"):
        return limits.max_json_bytes
    return limits.max_table_bytes if name in RUN_FILES or name in OPTIONAL_RUN_FILES else limits.max_model_bytes


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_files(run: Run) -> list[Path]:
    """The model's own files named in run.json (``model.source``, ``model.weights``)."""
    out = []
    for field in ("source", "weights"):
        value = run.meta["model"].get(field)
        if not value or ":" in str(value) and not Path(str(value)).is_file():  # demo:..., package.module:factory
            continue
        path = Path(str(value))
        if not path.is_file():
            raise BundleError(f"--with-model: run.json field 'model.{field}' names {path}, which is not a file here "
                              "(run from the folder the analysis ran in)")
        if not path.name.endswith(MODEL_SUFFIXES) or not _MODEL_NAME.match(path.name):
            raise BundleError(f"--with-model: {path} (run.json field 'model.{field}'): bundles carry only "
                              f"{', '.join(MODEL_SUFFIXES)} files with plain names (no pickled weights)")
        out.append(path)
        data = path.with_name(path.name + ".data")
        if path.suffix == ".onnx" and data.is_file():
            out.append(data)
    if not out:
        raise BundleError("--with-model: run.json names no model file (model.source / model.weights)")
    return out


def write_bundle(run_dir: str | os.PathLike, out: str | os.PathLike, *, with_model: bool = False) -> Path:
    """Zip the Run at ``run_dir`` into ``out`` (written atomically) and return ``out``.

    Raises:
        RunError: ``run_dir`` is not a readable Run.
        BundleError: ``with_model`` and the model file is missing or not a safe format; ``out`` is a folder.
    """
    run = load_run(run_dir)
    out = Path(out)
    if out.is_dir():
        raise BundleError(f"{out}: is a folder; give a file name (e.g. run.qlrun)")
    if not out.parent.is_dir():
        raise BundleError(f"{out.parent}: folder does not exist")
    members = [(name, run.path / name) for name in RUN_FILES]
    members += [(name, run.path / name) for name in OPTIONAL_RUN_FILES if (run.path / name).is_file()]
    if with_model:
        members += [(f"{MODEL_DIR}/{p.name}", p) for p in _model_files(run)]
    files = {name: {"bytes": p.stat().st_size, "sha256": _sha256_file(p)} for name, p in members}
    manifest = {"schema": BUNDLE_SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "run_schema": run.meta.get("schema"), "model_sha256": run.model_sha256,
                "with_model": with_model, "files": files}
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        zf.writestr(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n", zipfile.ZIP_DEFLATED)
        for name, p in members:  # Parquet is zstd-compressed already and weights barely deflate
            zf.write(p, name, zipfile.ZIP_DEFLATED if name.endswith(".json") else zipfile.ZIP_STORED)
    return out


def _check_members(zf: zipfile.ZipFile, where: str, limits: BundleLimits) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise BundleError(f"{where}: {len(infos)} members; a bundle holds at most {limits.max_members}")
    seen, total = set(), 0
    for info in infos:
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or "\\" in name or ".." in parts or re.match(r"^[A-Za-z]:", name) or "\0" in name:
            raise BundleError(f"{where}: member {name!r} has an unsafe path")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise BundleError(f"{where}: member {name!r} is a symbolic link")
        if name != MANIFEST and name not in RUN_FILES and name not in OPTIONAL_RUN_FILES and not _is_model_member(name):
            raise BundleError(f"{where}: unknown member {name!r}; a bundle holds {MANIFEST}, "
                              f"{', '.join(RUN_FILES)}, optionally {', '.join(OPTIONAL_RUN_FILES)}, "
                              f"and {MODEL_DIR}/*{{{','.join(MODEL_SUFFIXES)}}}")
        if name in seen:
            raise BundleError(f"{where}: member {name!r} appears twice")
        seen.add(name)
        if info.flag_bits & 0x1:
            raise BundleError(f"{where}: member {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise BundleError(f"{where}: member {name!r} uses an unsupported compression method")
        if info.file_size > _member_limit(name, limits):
            raise BundleError(f"{where}: member {name!r} declares {info.file_size:,} bytes; "
                              f"the limit is {_member_limit(name, limits):,}")
        total += info.file_size
    if total > limits.max_total_bytes:
        raise BundleError(f"{where}: {total:,} bytes uncompressed; the limit is {limits.max_total_bytes:,}")
    missing = [n for n in (MANIFEST, *RUN_FILES) if n not in seen]
    if missing:
        raise BundleError(f"{where}: not a QuantLens bundle (missing {', '.join(missing)})")
    return infos


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, where: str, limits: BundleLimits) -> str:
    """Copy one member to ``target``, counting real bytes; returns its sha256."""
    cap = min(info.file_size, _member_limit(info.filename, limits))
    h, n = hashlib.sha256(), 0
    try:
        with zf.open(info) as src, open(target, "wb") as dst:
            while chunk := src.read(_CHUNK):
                n += len(chunk)
                if n > cap:
                    raise BundleError(f"{where}: member {info.filename!r} holds more than its declared "
                                      f"{info.file_size:,} bytes")
                h.update(chunk)
                dst.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as e:
        if isinstance(e, BundleError):
            raise
        raise BundleError(f"{where}: member {info.filename!r} is corrupt ({e})") from None
    if n != info.file_size:
        raise BundleError(f"{where}: member {info.filename!r} holds {n:,} bytes, declared {info.file_size:,}")
    return h.hexdigest()


def _manifest(zf: zipfile.ZipFile, where: str, limits: BundleLimits) -> dict:
    info = zf.getinfo(MANIFEST)
    buf = io.BytesIO()
    with zf.open(info) as f:
        buf.write(f.read(limits.max_json_bytes + 1))
    try:
        m = json.loads(buf.getvalue())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{where}: {MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("schema") != BUNDLE_SCHEMA:
        raise BundleError(f"{where}: {MANIFEST} field 'schema' is {m.get('schema') if isinstance(m, dict) else None!r}; "
                          f"this version reads {BUNDLE_SCHEMA}")
    files = m.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str)
                                              for v in files.values()):
        raise BundleError(f"{where}: {MANIFEST} field 'files' must map each member to its sha256")
    return files


def open_bundle(source: str | os.PathLike | bytes | bytearray | BinaryIO, dest: str | os.PathLike,
                *, limits: BundleLimits = BundleLimits()) -> Run:
    """Check and extract a bundle into ``dest`` (absent or an empty folder) and return the Run there.

    Raises:
        BundleError: not a zip, an unsafe or unknown member, a limit exceeded, a member that does not
            match the manifest, or a Run that does not load; ``dest`` is left as it was.
    """
    where = "bundle" if isinstance(source, (bytes, bytearray)) or hasattr(source, "read") else str(source)
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BundleError(f"{dest}: exists and is not an empty folder")
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(bytes(source))
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise BundleError(f"{where}: not a QuantLens bundle (not a zip file: {e})") from None
    except OSError as e:
        raise BundleError(f"{where}: cannot read ({e.strerror or e})") from None
    with zf:
        infos = _check_members(zf, where, limits)
        files = _manifest(zf, where, limits)
        names = {i.filename for i in infos} - {MANIFEST}
        if set(files) != names:
            diff = sorted(set(files) ^ names)
            raise BundleError(f"{where}: {MANIFEST} does not list the members it holds ({', '.join(diff)})")
        dest.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.bundle-"))
        try:
            (stage / MODEL_DIR).mkdir()
            for info in infos:
                if info.filename == MANIFEST:
                    continue
                digest = _extract(zf, info, stage / info.filename, where, limits)
                if digest != files[info.filename]["sha256"]:
                    raise BundleError(f"{where}: member {info.filename!r} does not match its sha256 in {MANIFEST}")
            if not any((stage / MODEL_DIR).iterdir()):
                (stage / MODEL_DIR).rmdir()
            try:
                run = load_run(stage)
            except RunError as e:
                raise BundleError(f"{where}: the Run inside does not load ({str(e).replace(str(stage), 'bundle')})") from None
            if dest.exists():
                dest.rmdir()
            os.replace(stage, dest)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    return Run(dest, run.meta, run.tables)
