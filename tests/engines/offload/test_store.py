"""The unit store: chunked reads and writes against the tensors written, checksums on every read, atomic
versions, hard-link snapshots, and a full disk that loses nothing."""

import errno
import os

import pytest
import torch

from slimtune.engines.offload import store as S
from slimtune.engines.offload.snapshot import restore, snapshot


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(S, "CHUNK", 4096)  # several chunks per tensor (4096 x int8 = one 4 KiB block)
    return 4096


@pytest.mark.parametrize("direct", [True, False])
def test_roundtrip_whole_and_by_chunk(tmp_path, small_chunks, direct):
    st = S.UnitStore(tmp_path, io_threads=2, direct=direct)
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(3, 5000, generator=g),
        "codes": torch.randint(-127, 127, (9000,), dtype=torch.int8),
        "step": torch.tensor(7.0),
        "half": torch.randn(77, generator=g).bfloat16(),
    }
    st.write_all("layer.0", tensors, meta={"w": {"frugal_step": 3}})
    for name, t in tensors.items():
        out = torch.empty_like(t)
        st.read("layer.0", name, out).result()
        assert torch.equal(out, t), name
    flat = tensors["w"].reshape(-1)
    for start in range(0, flat.numel(), small_chunks):  # every chunk on its own, the short tail included
        part = torch.empty(min(small_chunks, flat.numel() - start))
        st.read("layer.0", "w", part, start).result()
        assert torch.equal(part, flat[start : start + part.numel()])
    assert st.meta("layer.0") == {"w": {"frugal_step": 3}}
    with pytest.raises(ValueError, match="multiple of 4096"):
        st.read("layer.0", "w", torch.empty(10), 10)
    st.close()


def test_writer_pieces_make_one_version_and_the_old_file_goes(tmp_path, small_chunks):
    st = S.UnitStore(tmp_path, io_threads=2)
    st.write_all("u", {"a": torch.zeros(10000)})
    first = st.files["u"]
    a = torch.arange(10000, dtype=torch.float32)
    w = st.writer("u", [("a", torch.float32, (10000,))])
    w.write("a", a[4096:8192], 4096)  # out of order, in pieces
    w.write("a", a[:4096], 0)
    w.write("a", a[8192:], 8192)
    w.commit()
    out = torch.empty(10000)
    st.read("u", "a", out).result()
    assert torch.equal(out, a) and not (tmp_path / first).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [st.files["u"]]  # no temp file left
    st.close()


def test_a_flipped_byte_is_caught_and_names_the_file(tmp_path):
    st = S.UnitStore(tmp_path)
    st.write_all("layer.3", {"w": torch.randn(1000)})
    path = tmp_path / st.files["layer.3"]
    with open(path, "r+b") as f:
        f.seek(st.specs("layer.3")["w"].offset + 123)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(S.StoreCorrupt, match=f"{path}: checksum mismatch in tensor 'w'"):
        st.read("layer.3", "w", torch.empty(1000)).result()
    st.close()


def test_snapshot_is_hard_links_and_survives_later_writes(tmp_path):
    st = S.UnitStore(tmp_path / "live")
    a = torch.randn(100)
    st.write_all("u", {"a": a})
    st.write_all("u~grad", {"a": a})  # transient: never in a snapshot
    snapshot(st, tmp_path / "snap", {"step": 5})
    snap_file = tmp_path / "snap" / st.files["u"]
    assert os.stat(snap_file).st_ino == os.stat(tmp_path / "live" / st.files["u"]).st_ino  # no copy
    assert not any("~grad" in p.name for p in (tmp_path / "snap").iterdir())
    st.write_all("u", {"a": a * 2})  # a new version; the snapshot's file is untouched
    assert restore(st, tmp_path / "snap") == {"step": 5}
    out = torch.empty(100)
    st.read("u", "a", out).result()
    assert torch.equal(out, a)
    st.close()


def test_full_disk_is_a_clear_error_and_keeps_the_previous_version(tmp_path, monkeypatch):
    st = S.UnitStore(tmp_path, direct=False)
    a = torch.randn(1000)
    st.write_all("u", {"a": a})
    before = st.files["u"]

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(S.os, "pwritev", full)
    with pytest.raises(S.StoreFull, match="no space left on the device while writing u"):
        st.write_all("u", {"a": a * 2})
    monkeypatch.undo()
    assert st.files["u"] == before and sorted(p.name for p in tmp_path.iterdir()) == [before]  # temp removed
    out = torch.empty(1000)
    st.read("u", "a", out).result()
    assert torch.equal(out, a)
    st.close()


def _store_with_snapshot(tmp_path):
    """A store whose layer.0 changed after its snapshot step_1 (so restoring it would be visible)."""
    st = S.UnitStore(tmp_path / "run" / "live")
    a = torch.randn(100)
    st.write_all("layer.0", {"a": a})
    st.write_all("embed", {"a": a * 3})
    snap = tmp_path / "run" / "snapshots" / "step_1"
    snapshot(st, snap, {"step": 1})
    st.write_all("layer.0", {"a": a * 2})
    return st, snap, a


def _tree(root):
    return sorted((str(p), p.stat().st_ino, p.stat().st_nlink) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "tamper, needle",
    [
        ("unit ../../escaped", "files names the unit '../../escaped'"),
        ("absolute file name", "files['layer.0'] names '/"),
        ("'..' file name", "files['layer.0'] names '../../../outside.bin'"),
        ("missing file", "missing; the snapshot is incomplete"),
        ("not a store file", "not a slimtune store file"),
        ("flipped byte", "checksum mismatch"),
    ],
)
def test_restore_checks_the_whole_snapshot_before_touching_anything(tmp_path, tamper, needle):
    """A snapshot is untrusted input: a unit or file name from its manifest never reaches a path outside the
    store or the snapshot, and a bad snapshot leaves the store's current files as they were."""
    import json

    from slimtune.errors import SlimtuneError

    st, snap, a = _store_with_snapshot(tmp_path)
    manifest = json.loads((snap / "manifest.json").read_text())
    layer = snap / manifest["files"]["layer.0"]
    (tmp_path / "outside.bin").write_bytes(layer.read_bytes())  # a valid unit file outside the snapshot
    if tamper.startswith("unit"):
        manifest["files"]["../../escaped"] = manifest["files"].pop("layer.0")
    elif tamper.startswith("absolute"):
        manifest["files"]["layer.0"] = str(tmp_path / "outside.bin")
    elif tamper.startswith("'..'"):
        manifest["files"]["layer.0"] = "../../../outside.bin"
    elif tamper == "missing file":
        layer.unlink()
    elif tamper == "not a store file":
        layer.write_bytes(b"not a unit file")
    else:
        data = bytearray(layer.read_bytes())
        data[st.specs("layer.0")["a"].offset + 5] ^= 0x01
        layer.write_bytes(bytes(data))
    (snap / "manifest.json").write_text(json.dumps(manifest))
    files, tree = dict(st.files), _tree(tmp_path)
    with pytest.raises(SlimtuneError, match="^[^\n]*$") as e:  # one line
        restore(st, snap)
    assert needle in str(e.value)
    assert _tree(tmp_path) == tree  # nothing created, deleted or linked anywhere
    assert st.files == files
    out = torch.empty(100)
    st.read("layer.0", "a", out).result()
    assert torch.equal(out, a * 2)  # the current version still reads
    st.close()


def test_a_symlinked_snapshot_file_stays_loadable(tmp_path):
    st, snap, a = _store_with_snapshot(tmp_path)
    layer = next(snap.glob("layer.0.*.bin"))
    blob = tmp_path / "blobs" / "x.bin"
    blob.parent.mkdir()
    os.replace(layer, blob)
    layer.symlink_to(os.path.relpath(blob, snap))
    assert restore(st, snap) == {"step": 1}
    out = torch.empty(100)
    st.read("layer.0", "a", out).result()
    assert torch.equal(out, a)
    st.close()
