"""Every reader of a pickle-based file refuses a payload and runs none of it (issue 12, section 4).

The payload is the one the issue reproduced: ``torch.save({"state_dict": <valid>, "meta": {"x": P()}})``
where unpickling ``P`` calls ``numpy.testing._private.utils.runstring(code, {})``, a numpy global that
the old segmentation-head reader allow-listed with every other ``numpy*`` name. ``code`` writes a
marker file, so "no command ran" is checked by the marker's absence. Each case first loads the same
file without the payload, so a refusal cannot come from a file the reader would reject anyway.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.testing._private.utils import runstring

from dinolab.errors import DinolabError
from dinolab.models import create_model
from dinolab.models.checkpoints import (
    UnsafeFileError,
    load_model,
    numpy_data_globals,
    safe_pickle_load,
    safe_torch_load,
    save_official,
)


class RunString:
    """Unpickles as ``runstring(code, {})``: ``exec`` of a command that writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.code = f"open({str(marker)!r}, 'w').write('x')"

    def __reduce__(self):
        return (runstring, (self.code, {}))


def _arm(obj: dict, marker: Path) -> dict:
    """``obj`` with the payload in its ``meta`` (the issue's layout)."""
    return {**obj, "meta": {**(obj.get("meta") or {}), "x": RunString(marker)}}


def _tiny_backbone():
    return create_model("vit_tiny_patch4", img_size=32, depth=2)


# ------------------------------------------------------------------ one case per entry point
# each: (write a valid file at path; returns the object torch.save wrote), (read it with the entry point)


def _backbone(tmp: Path):
    path = tmp / "backbone.pth"
    save_official(_tiny_backbone(), path)
    return path, {"state_dict": torch.load(path, weights_only=True)}, lambda: load_model(path)


def _seg_head(tmp: Path):
    from dinolab.eval.segmentation import LinearSegHead, read_seg_head, save_seg_head

    path = save_seg_head(tmp / "seg.pth", LinearSegHead(192, 3), classes=["a", "b", "c"],
                         palette=[[1, 2, 3]] * 3, settings={"model": "tiny"})
    return path, torch.load(path, weights_only=True), lambda: read_seg_head(path)


def _depth_head(tmp: Path):
    from dinolab.eval.depth_heads import build_head, load_depth_head, make_head_config, save_depth_head

    cfg = make_head_config("lin1", 192, 2, max_depth=10.0)
    path = save_depth_head(build_head(cfg), cfg, tmp / "depth.pth", model="tiny")
    return path, torch.load(path, weights_only=True), lambda: load_depth_head(path)


def _train_checkpoint(tmp: Path):
    from dinolab.train.checkpointing import load_checkpoint, save_checkpoint

    path = save_checkpoint(tmp / "run", 3, {"model": _tiny_backbone().state_dict()})
    return path, torch.load(path, weights_only=True), lambda: load_checkpoint(path, restore_rng=False)


def _resume(tmp: Path):
    """The resume path of ``dinolab train``: the run folder's newest checkpoint is read (then checked
    against the config) by ``loop._previous_run``."""
    from dinolab.config import load_config
    from dinolab.train.checkpointing import save_checkpoint
    from dinolab.train.loop import _previous_run

    model = _tiny_backbone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = save_checkpoint(tmp / "run", 3, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    cfg = load_config("cpu-smoke")
    return path, torch.load(path, weights_only=True), lambda: _previous_run(tmp / "run", cfg, {}, force=True)


def _serve_seg_flag(tmp: Path):
    from dinolab.serve.heads import load_seg_head

    path, obj, _ = _seg_head(tmp)
    return path, obj, lambda: load_seg_head(str(path), _tiny_backbone())


def _serve_depth_flag(tmp: Path):
    from dinolab.serve.heads import load_depth_head

    path, obj, _ = _depth_head(tmp)
    return path, obj, lambda: load_depth_head(str(path), _tiny_backbone())


CASES = {"backbone": _backbone, "seg_head": _seg_head, "depth_head": _depth_head,
         "train_checkpoint": _train_checkpoint, "resume": _resume, "serve_seg_head": _serve_seg_flag,
         "serve_depth_head": _serve_depth_flag}


@pytest.mark.parametrize("entry", sorted(CASES))
def test_payload_is_refused_and_runs_nothing(entry, tmp_path, monkeypatch):
    monkeypatch.setattr("dinolab.train.loop.load_full_state", lambda *a: None)  # resume: stop after the load
    path, obj, read = CASES[entry](tmp_path)
    read()  # the unarmed file loads
    marker = tmp_path / "marker"
    torch.save(_arm(obj, marker), path)
    with pytest.raises(UnsafeFileError) as err:
        read()
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "numpy.testing._private.utils.runstring" in msg
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really is armed: an unsafe load runs the command
    assert marker.read_text() == "x"


def test_revisited_ground_truth_payload(tmp_path):
    from dinolab.curate.revisited import load_revisited

    data = {"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": np.array([0]), "hard": [], "junk": []}]}
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps(data))
    assert load_revisited(tmp_path, "roxford5k").imlist == ["a"]
    marker = tmp_path / "marker"
    path.write_bytes(pickle.dumps(_arm(data, marker)))
    with pytest.raises(UnsafeFileError, match=r"gnd_roxford5k\.pkl: it pickles numpy\.testing\._private"):
        load_revisited(tmp_path, "roxford5k")
    assert not marker.exists()


def test_index_features_payload(tmp_path):
    """An index folder's only binary file, features.npy, is never unpickled."""
    from dinolab.curate.index import ExactIndex, load_index

    folder = ExactIndex(np.eye(2, dtype=np.float32), ["a", "b"], "m").save(tmp_path / "index")
    assert load_index(folder).ids == ["a", "b"]
    marker = tmp_path / "marker"
    payload = np.empty((2, 2), dtype=object)
    payload[:] = RunString(marker)
    np.save(folder / "features.npy", payload, allow_pickle=True)
    with pytest.raises(DinolabError, match=r"features\.npy.*allow_pickle"):
        load_index(folder)
    assert not marker.exists()


def test_index_meta_not_json(tmp_path):
    from dinolab.curate.index import ExactIndex, load_index

    folder = ExactIndex(np.eye(2, dtype=np.float32), ["a", "b"], "m").save(tmp_path / "index")
    for text, expect in (("{not json", "cannot read"), ("[1, 2]", "JSON list")):
        (folder / "meta.json").write_text(text)
        with pytest.raises(DinolabError, match=expect) as err:
            load_index(folder)
        assert "meta.json" in str(err.value)


# ------------------------------------------------------------------ what is still read


NUMPY_META = {"arr": np.arange(6, dtype=np.int16).reshape(2, 3), "f16": np.ones(2, np.float16),
              "strs": np.array(["road", "sky"]), "bools": np.array([True, False]), "cplx": np.array([1j]),
              "when": np.array(["2024-01-01"], dtype="datetime64[D]"), "rec": np.zeros(1, [("a", "<i4")]),
              "dtype": np.dtype("float32"), "scalar": np.float64(0.5), "int": np.int64(3),
              "b": np.bool_(True)}


def _same(a, b) -> bool:
    return a == b if isinstance(a, np.dtype) else bool(np.all(np.asarray(a) == np.asarray(b))) and \
        np.asarray(a).dtype == np.asarray(b).dtype


def test_numpy_data_in_metadata_still_loads(tmp_path):
    """mmcv checkpoints keep numpy arrays, dtypes and scalars in ``meta``: all of those are data."""
    from dinolab.eval.segmentation import LinearSegHead, read_seg_head, save_seg_head

    path = save_seg_head(tmp_path / "seg.pth", LinearSegHead(192, 2), classes=["a", "b"],
                         palette=[[1, 2, 3], [4, 5, 6]], settings={})
    obj = torch.load(path, weights_only=True)
    obj["meta"].update(NUMPY_META, PALETTE=np.array([[1, 2, 3], [4, 5, 6]]))
    torch.save(obj, path)
    back = safe_torch_load(path)
    assert all(_same(back["meta"][k], v) for k, v in NUMPY_META.items())
    assert read_seg_head(path).palette == [(1, 2, 3), (4, 5, 6)]
    pkl = tmp_path / "meta.pkl"
    pkl.write_bytes(pickle.dumps(NUMPY_META))
    assert all(_same(safe_pickle_load(pkl)[k], v) for k, v in NUMPY_META.items())


def _as_numpy1(data: bytes) -> bytes:
    """A protocol-2 pickle (GLOBAL opcodes: newline-ended names) as numpy 1.x writes it."""
    assert b"numpy._core.multiarray" in data
    return data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def test_numpy_1_module_names_are_accepted(tmp_path):
    """Files written under numpy 1.x name ``numpy.core.multiarray._reconstruct``; numpy 2 ``numpy._core``."""
    import zipfile

    value = {"a": np.arange(3), "s": np.float32(2.5)}
    (tmp_path / "old.pkl").write_bytes(_as_numpy1(pickle.dumps(value, protocol=2)))
    torch.save(value, tmp_path / "new.pth")
    with zipfile.ZipFile(tmp_path / "new.pth") as src, zipfile.ZipFile(tmp_path / "old.pth", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, _as_numpy1(data) if item.filename.endswith("data.pkl") else data)
    for back in (safe_pickle_load(tmp_path / "old.pkl"), safe_torch_load(tmp_path / "old.pth")):
        np.testing.assert_array_equal(back["a"], np.arange(3))
        assert back["s"] == np.float32(2.5) and back["s"].dtype == np.float32


def test_object_arrays_and_other_numpy_globals_are_refused(tmp_path):
    marker = tmp_path / "marker"
    for obj, name in ((np.array([1, None], dtype=object), "ObjectDType"),
                      (np.ones(2), None)):
        path = tmp_path / "f.pth"
        torch.save({"meta": obj, "x": RunString(marker) if name is None else 0}, path)
        with pytest.raises(UnsafeFileError, match=name or "runstring"):
            safe_torch_load(path)
    assert not marker.exists()


def test_unreadable_files_name_the_file(tmp_path):
    for content in (b"", b"not a checkpoint at all", b"PK\x03\x04truncated"):
        path = tmp_path / "bad.pth"
        path.write_bytes(content)
        with pytest.raises(DinolabError, match="cannot read .*bad.pth") as err:
            safe_torch_load(path)
        assert not isinstance(err.value, UnsafeFileError) and "\n" not in str(err.value)
    with pytest.raises(DinolabError, match="cannot read .*bad.pth as a pickle"):
        safe_pickle_load(path)
