from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from orchestrator.errors import InvalidUpdate, PayloadTooLarge, SourceNotAllowed
from orchestrator.service.sources import (
    UploadSink,
    check_header,
    inspect_files,
    resolve_path_source,
)

EXPECTED = {
    "a.weight": ((4, 8), (torch.bfloat16, torch.float16, torch.float32)),
    "b.weight": ((8,), (torch.bfloat16, torch.float16, torch.float32)),
}


def _state(**overrides: torch.Tensor) -> dict[str, torch.Tensor]:
    state = {"a.weight": torch.randn(4, 8, dtype=torch.bfloat16), "b.weight": torch.randn(8)}
    state.update(overrides)
    return state


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


def test_file_and_directory_sources(root: Path) -> None:
    save_file(_state(), root / "m.safetensors")
    assert resolve_path_source(str(root / "m.safetensors"), [root]).files == (
        root / "m.safetensors",
    )
    d = root / "ckpt"
    d.mkdir()
    save_file({"a.weight": torch.randn(4, 8)}, d / "model-00001-of-00002.safetensors")
    save_file({"b.weight": torch.randn(8)}, d / "model-00002-of-00002.safetensors")
    files = resolve_path_source(str(d), [root])
    assert [f.name for f in files.files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    header = inspect_files(files, max_tensors=10)
    assert header == {"a.weight": ("F32", [4, 8]), "b.weight": ("F32", [8])}


def test_sharded_index_is_followed(root: Path) -> None:
    d = root / "ckpt"
    d.mkdir()
    save_file({"a.weight": torch.randn(4, 8)}, d / "part1.safetensors")
    save_file({"b.weight": torch.randn(8)}, d / "part2.safetensors")
    save_file({"stray": torch.randn(2)}, d / "unrelated.safetensors")
    index = {"weight_map": {"a.weight": "part1.safetensors", "b.weight": "part2.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    files = resolve_path_source(str(d), [root])
    assert [f.name for f in files.files] == ["part1.safetensors", "part2.safetensors"]
    index["weight_map"]["b.weight"] = "missing.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidUpdate, match="missing.safetensors"):
        resolve_path_source(str(d), [root])
    for bad_map in (["part1.safetensors"], {"b.weight": 3}, {"b.weight": "x\u0000y"}):
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": bad_map}))
        with pytest.raises(InvalidUpdate, match="weight_map must map tensor names to file names"):
            resolve_path_source(str(d), [root])


@pytest.mark.parametrize(
    "entry", ["../escape.safetensors", "..", ".", "sub/part.safetensors", "ABSOLUTE", "LINK"]
)
def test_an_index_entry_that_is_not_a_file_of_its_directory_gets_one_answer(
    root: Path, tmp_path: Path, entry: str
) -> None:
    """However an entry leaves the index's directory, the answer is the same code and words."""
    d = root / "ckpt"
    (d / "sub").mkdir(parents=True)
    save_file({"a.weight": torch.randn(4, 8)}, d / "sub" / "part.safetensors")
    save_file({"a.weight": torch.randn(4, 8)}, root / "escape.safetensors")
    outside = tmp_path / "outside.safetensors"
    save_file({"a.weight": torch.randn(4, 8)}, outside)
    if entry == "ABSOLUTE":
        entry = str(outside)
    elif entry == "LINK":
        (d / "link.safetensors").symlink_to(outside)
        entry = "link.safetensors"
    index = {"weight_map": {"a.weight": entry}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SourceNotAllowed) as caught:
        resolve_path_source(str(d), [root])
    assert caught.value.message == (
        f"model.safetensors.index.json names {entry!r}, which is not a file of {d}; weight_map "
        "must map tensor names to file names in the index's directory"
    )
    assert caught.value.status_code == 400


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_a_device_as_the_source_path_says_what_it_is(root: Path, kind: str) -> None:
    if kind == "fifo":
        path = root / "pipe.safetensors"
        os.mkfifo(path)
        words = "is a FIFO"
    else:
        path = root / "null"
        path.symlink_to("/dev/null")
        words = "is a device"
    with pytest.raises(SourceNotAllowed) as caught:
        resolve_path_source(str(path), [root, Path("/dev")])
    assert caught.value.message == (
        f"source.path {str(path)!r} {words}, not a .safetensors file or a directory of them"
    )


@pytest.mark.parametrize("make", ["dotdot", "absolute", "symlink", "relative"])
def test_paths_outside_the_roots_are_refused(root: Path, tmp_path: Path, make: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file(_state(), outside / "m.safetensors")
    if make == "dotdot":
        path = str(root / ".." / "outside" / "m.safetensors")
    elif make == "absolute":
        path = str(outside / "m.safetensors")
    elif make == "symlink":
        (root / "link.safetensors").symlink_to(outside / "m.safetensors")
        path = str(root / "link.safetensors")
    else:
        path = "outside/m.safetensors"
    with pytest.raises(SourceNotAllowed):
        resolve_path_source(path, [root])


def test_symlinked_file_in_a_directory_escaping_is_refused(root: Path, tmp_path: Path) -> None:
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    d = root / "ckpt"
    d.mkdir()
    (d / "model.safetensors").symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(SourceNotAllowed, match="links outside"):
        resolve_path_source(str(d), [root])


def test_no_roots_means_no_path_sources(root: Path) -> None:
    with pytest.raises(SourceNotAllowed, match="allowed_roots"):
        resolve_path_source(str(root), [])


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "ckpt.pth", "x.pkl"])
def test_pickles_are_refused_with_advice(root: Path, name: str) -> None:
    (root / name).write_bytes(b"\x80\x04not really")
    with pytest.raises(SourceNotAllowed, match="pickle.*convert it to safetensors"):
        resolve_path_source(str(root / name), [root])
    d = root / "dir"
    d.mkdir()
    (d / name).write_bytes(b"\x80\x04")
    with pytest.raises(SourceNotAllowed, match="pickle"):
        resolve_path_source(str(d), [root])


def test_broken_files_are_invalid(root: Path) -> None:
    save_file(_state(), root / "good.safetensors")
    good = (root / "good.safetensors").read_bytes()
    (root / "junk.safetensors").write_bytes(b"this is not a safetensors file at all")
    (root / "trunc.safetensors").write_bytes(good[:-7])
    n = struct.unpack("<Q", good[:8])[0]
    header = good[8 : 8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1)
    (root / "lie.safetensors").write_bytes(good[:8] + header + good[8 + n :])
    for name in ("junk", "trunc", "lie"):
        files = resolve_path_source(str(root / f"{name}.safetensors"), [root])
        with pytest.raises(InvalidUpdate, match="not a valid safetensors file"):
            inspect_files(files, max_tensors=10)


def test_too_many_tensors(root: Path) -> None:
    save_file({f"t{i}": torch.zeros(1) for i in range(5)}, root / "m.safetensors")
    with pytest.raises(PayloadTooLarge, match="max_tensors=4"):
        inspect_files(resolve_path_source(str(root / "m.safetensors"), [root]), max_tensors=4)


def test_header_checks_name_every_problem() -> None:
    check_header({"a.weight": ("BF16", [4, 8]), "b.weight": ("F32", [8])}, EXPECTED)
    with pytest.raises(InvalidUpdate, match=r"missing tensors: b\.weight"):
        check_header({"a.weight": ("BF16", [4, 8])}, EXPECTED)
    with pytest.raises(InvalidUpdate, match=r"unexpected tensors: c\.weight"):
        check_header({"a.weight": ("BF16", [4, 8]), "b.weight": ("F32", [8]),
                      "c.weight": ("F32", [1])}, EXPECTED)  # fmt: skip
    with pytest.raises(InvalidUpdate, match=r"a\.weight has shape \[8, 4\], expected \[4, 8\]"):
        check_header({"a.weight": ("BF16", [8, 4]), "b.weight": ("F32", [8])}, EXPECTED)
    with pytest.raises(InvalidUpdate, match=r"a\.weight is I32"):
        check_header({"a.weight": ("I32", [4, 8]), "b.weight": ("F32", [8])}, EXPECTED)


def test_upload_sink_streams_hashes_and_limits(tmp_path: Path) -> None:
    sink = UploadSink(tmp_path / "up", "u1", max_bytes=10)
    sink.write(b"hello")
    sink.write(b"world")
    digest = sink.finish()
    assert sink.path.read_bytes() == b"helloworld"
    assert digest == "936a185caaa266bb9cbe981e9e05cb78cd732b0b3280eb944412bb6f8f8f07af"

    big = UploadSink(tmp_path / "up", "u2", max_bytes=10)
    big.write(b"12345")
    with pytest.raises(PayloadTooLarge, match="max_upload_bytes=10"):
        big.write(b"678901")
    assert not big.path.exists()
    assert os.listdir(tmp_path / "up") == ["u1.safetensors"]

    empty = UploadSink(tmp_path / "up", "u3", max_bytes=10)
    with pytest.raises(InvalidUpdate, match="empty"):
        empty.finish()


def test_a_fifo_in_a_source_directory_is_refused_without_blocking(root: Path) -> None:
    ckpt = root / "fifo-ckpt"
    ckpt.mkdir()
    os.mkfifo(ckpt / "model.safetensors")
    # Nothing ever opens the FIFO for writing: a blocking open would hang this test.
    files = resolve_path_source(str(ckpt), [root])
    with pytest.raises(InvalidUpdate, match="is not a regular file"):
        inspect_files(files, max_tensors=10)
