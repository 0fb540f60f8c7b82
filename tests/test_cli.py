"""The command line as a whole: one-line errors (tracebacks only with --debug), the shared flags on
every command, and `dinolab embed`'s run key and finite-feature checks."""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dinolab.cli import build_parser, main
from dinolab.models import create_model, save_official
from tests.conftest import random_pngs

SRC = Path(__file__).resolve().parents[1] / "src"
EMBED = ["--resize", "32", "--crop", "32", "--no-progress", "--device", "cpu", "--num-workers", "0"]


def _report_lines(err: str) -> list[str]:
    """stderr lines that are not log records (``HH:MM:SS LEVEL name: ...``)."""
    return [ln for ln in err.splitlines() if ln.strip() and not (ln[:2].isdigit() and ln[2:3] == ":")]


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    return random_pngs(tmp_path_factory.mktemp("imgs"), 3, 32)


def _ckpt(path: Path, seed: int = 0, *, fill: float | None = None, **kw) -> Path:
    torch.manual_seed(seed)
    model = create_model("vit_tiny_patch8", **({"depth": 1} | kw))
    if fill is not None:
        with torch.no_grad():
            model.blocks[0].attn.qkv.weight.fill_(fill)
    return save_official(model, path)


# ------------------------------------------------------------------------------------ errors


def test_bad_checkpoints_and_inputs_end_in_one_line(tmp_path, imgs, capsys):
    impossible = tmp_path / "wide.pth"  # width 200 -> 3 heads of 64: "embed dim not divisible" in the model
    torch.save({"cls_token": torch.zeros(1, 1, 200), "pos_embed": torch.zeros(1, 5, 200),
                "patch_embed.proj.weight": torch.zeros(200, 3, 4, 4), "blocks.0.mlp.fc1.weight": torch.zeros(800, 200),
                "blocks.0.ls1.gamma": torch.zeros(200)}, impossible)
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    cases = [(["embed", str(imgs), "--out", str(tmp_path / "o1"), "--model", str(impossible)], "wide.pth"),
             (["embed", str(imgs), "--out", str(tmp_path / "o2"), "--model", str(corrupt)], "bad.safetensors"),
             (["embed", str(tmp_path / "no_such_folder"), "--out", str(tmp_path / "o3"), "--model",
               "vit_tiny_patch4", "--random-init"], "no_such_folder")]
    for argv, named in cases:
        assert main([*argv, *EMBED]) == 2
        err = capsys.readouterr().err
        lines = _report_lines(err)
        assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0]
        assert main(["--debug", *argv, *EMBED]) == 2  # --debug: the same line after the traceback
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and err.rstrip().splitlines()[-1] == lines[0]
    assert main([*cases[0][0], *EMBED, "--debug"]) == 2  # also after the command
    assert "Traceback" in capsys.readouterr().err


def test_disk_full_and_internal_errors_are_one_line(tmp_path, imgs, capsys, monkeypatch):
    import dinolab.curate.embed as embed_mod

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(embed_mod, "_write_shard", full)
    argv = ["embed", str(imgs), "--out", str(tmp_path / "o"), "--model", "vit_tiny_patch4", "--random-init", *EMBED]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert _report_lines(err) == ["error: [Errno 28] No space left on device"] and "Traceback" not in err
    monkeypatch.setattr(embed_mod, "_write_shard", lambda *a, **k: {}["bug"])
    assert main([*argv, "--overwrite"]) == 1  # a bug: still one line, pointing at --debug
    lines = _report_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "internal error" in lines[0] and "KeyError" in lines[0] and "--debug" in lines[0]


def test_python_m_dinolab_prints_no_traceback(tmp_path):
    """The real entry point in a fresh process (logging to stderr as a user sees it)."""
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\xff\xff\xff\xff\x00\x00\x00\x00 header longer than the file")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    r = subprocess.run([sys.executable, "-m", "dinolab", "pca", str(tmp_path / "none.png"), "--model", str(bad),
                        "--out", str(tmp_path / "p.png")], check=False, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(_report_lines(r.stderr)) == 1 and "x.safetensors" in _report_lines(r.stderr)[0]


# -------------------------------------------------------------------------------- shared flags


def _commands() -> dict[str, argparse.ArgumentParser]:
    out = {}

    def walk(p, path):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out[" ".join(path)] = p
        for a in subs:
            for name, child in a.choices.items():
                walk(child, (*path, name))

    walk(build_parser(), ())
    return out


SUBSETS = {"eval knn", "eval linear", "eval logreg", "seg train", "seg eval", "depth train", "depth eval"}
LONG_WORK = SUBSETS | {"embed", "train", "index search", "index revisited", "seg predict", "depth predict",
                       "curate dedup", "curate select", "curate cluster", "curate sample", "curate run"}
OUTPUT_FOLDER = SUBSETS | {"embed", "index build", "index revisited", "seg predict", "depth predict"}


def test_shared_flags_are_on_every_command_that_needs_them():
    cmds = _commands()
    assert SUBSETS | LONG_WORK | OUTPUT_FOLDER <= set(cmds)
    for name, p in cmds.items():
        flags = p._option_string_actions
        assert "--debug" in flags, name
        assert ("--limit" in flags and "--test-limit" in flags) == (name in SUBSETS), name
        assert ("--few-shot" in flags) == name.startswith("eval "), name
        assert "--no-progress" in flags or name not in LONG_WORK, name
        assert "--overwrite" in flags or name not in OUTPUT_FOLDER, name
        if "--random-init" in flags and name != "serve":
            assert "--seed" in flags, name


def test_shared_flags_parse_everywhere():
    ap = build_parser()
    a = ap.parse_args(["eval", "knn", "--train", "t", "--test", "t", "--limit", "5", "--test-limit", "2",
                       "--few-shot", "1", "--seed", "3", "--no-progress", "--overwrite"])
    assert (a.limit, a.test_limit, a.few_shot, a.seed, a.no_progress, a.overwrite) == (5, 2, 1, 3, True, True)
    for argv in (["seg", "train", "--train", "t"], ["seg", "eval", "--head", "h", "--data", "d"],
                 ["depth", "train", "--train", "t"], ["depth", "eval", "--head", "h", "--data", "d"]):
        a = ap.parse_args([*argv, "--limit", "4", "--no-progress", "--overwrite"])
        assert a.limit == 4 and a.test_limit is None and a.no_progress and a.overwrite and not a.debug
    assert ap.parse_args(["--debug", "models"]).debug and ap.parse_args(["models", "--debug"]).debug


# ------------------------------------------------------------------------------ embed run key


def test_embed_refuses_a_resume_with_other_weights(tmp_path, imgs, capsys):
    ckpt, out = tmp_path / "m.pth", tmp_path / "emb"
    _ckpt(ckpt, 0)
    argv = ["embed", str(imgs), "--out", str(out), "--model", str(ckpt), *EMBED]
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert len(run["weights_sha256"]) == 64 and run["model_options"]["model"] == str(ckpt.resolve())
    _ckpt(ckpt, 1)  # the checkpoint file overwritten between the runs
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "weights_sha256" in err and "--overwrite" in err
    assert main([*argv, "--overwrite"]) == 0


def test_embed_refuses_changed_weights_flag_and_seeds_random_init(tmp_path, imgs, capsys):
    a, b = _ckpt(tmp_path / "a.pth", 0, depth=12), _ckpt(tmp_path / "b.pth", 1, depth=12)
    base = ["embed", str(imgs), "--model", "vit_tiny_patch8", *EMBED]
    assert main([*base, "--out", str(tmp_path / "e"), "--weights", str(a)]) == 0
    assert main([*base, "--out", str(tmp_path / "e"), "--weights", str(b)]) == 2
    assert "model_options" in capsys.readouterr().err
    rand = ["embed", str(imgs), "--model", "vit_tiny_patch4", "--random-init", *EMBED]
    assert main([*rand, "--out", str(tmp_path / "r1")]) == 0
    assert main([*rand, "--out", str(tmp_path / "r2")]) == 0
    assert np.array_equal(np.load(tmp_path / "r1" / "cls.npy"), np.load(tmp_path / "r2" / "cls.npy"))  # seeded
    assert main([*rand, "--out", str(tmp_path / "r1"), "--seed", "1"]) == 2  # another init: no silent mix


def test_non_finite_weights_are_refused_by_embed_and_search(tmp_path, imgs, capsys):
    nan = _ckpt(tmp_path / "nan.pth", fill=float("nan"))
    assert main(["embed", str(imgs), "--out", str(tmp_path / "e"), "--model", str(nan), *EMBED]) == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "nan.pth" in err and not (tmp_path / "e" / "meta.json").exists()

    good = _ckpt(tmp_path / "good.pth")
    assert main(["embed", str(imgs), "--out", str(tmp_path / "g"), "--model", str(good), *EMBED]) == 0
    assert main(["index", "build", "--embeddings", str(tmp_path / "g"), "--out", str(tmp_path / "idx")]) == 0
    out = tmp_path / "s.json"
    rc = main(["index", "search", "--index", str(tmp_path / "idx"), "--image", str(imgs / "0.png"), "--model",
               str(nan), "--out", str(out), "--device", "cpu"])
    assert rc == 2 and "non-finite" in capsys.readouterr().err and not out.exists()  # never "score": NaN
