"""Every code block of README.md is run (python), parsed (bash) or loaded (yaml) by a test.

- ```python blocks run in a fresh namespace, in a temporary folder that holds what they name
  (``photos/``, ``room.jpg``), with ``DINOLAB_OFFLINE=1``, a temporary cache, tiny fake CamVid /
  7-Scenes / NYU archives where the named datasets are looked up, tiny official-named heads in the
  weights cache, and ``dinolab.load_model(<official name>)`` replaced by a seeded random backbone of
  the same kind (patch size, registers, FFN) but 32 wide and 4 deep. Input placeholders the prose
  explains (``x``, ``H``, ``W``, ``bool_mask``) come from ``PRELUDES``.
- ```bash blocks: each ``dinolab ...`` command (also after ``torchrun ... -m``) is parsed by the CLI's
  own parser, once per alternative of ``a|b`` and ``[x | y]``; a command with ``...`` elided is checked
  for its subcommand and option names only. ``./script`` lines must name executable files, ``curl``
  lines routes of the app.
- ```yaml blocks are read with ``dinolab.serve.settings.load_settings``.
- ```text blocks are sample output, not run.

A block that cannot run here carries ``<!-- readme-test: skip (reason) -->`` on the line before it;
the test reports it as skipped with that reason. Any other fence language fails the test.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import re
import shlex
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")
LANGS = ("python", "bash", "yaml", "text")


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # line of the opening fence, 1-based
    skip: str | None  # reason from a skip marker

    @property
    def id(self) -> str:
        return f"{self.lang}-L{self.line}"


def read_blocks(text: str) -> list[Block]:
    """Fenced blocks of a markdown text with their language, line and skip marker."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        prev = lines[i - 1] if i else ""
        marker = MARKER.search(prev)
        blocks.append(Block(m.group(1), "\n".join(lines[i + 1:end]) + "\n", i + 1,
                            marker.group("reason") if marker else None))
        i = end + 1
    return blocks


BLOCKS = read_blocks(README.read_text())


def _of(lang: str) -> list[Block]:
    return [b for b in BLOCKS if b.lang == lang]


# -------------------------------------------------------------------------------- the catalogue


def test_every_block_has_a_known_language_and_markers_sit_on_blocks():
    assert BLOCKS, "no code blocks found in README.md"
    unknown = [(b.line, b.lang or "(none)") for b in BLOCKS if b.lang not in LANGS]
    assert not unknown, f"README blocks with a language the test does not run: {unknown} (use one of {LANGS})"
    lines = README.read_text().splitlines()
    fences = {b.line for b in BLOCKS}
    markers = [n for n, ln in enumerate(lines) if ln.lstrip().startswith("<!--") and "readme-test" in ln]
    stray = [n + 1 for n in markers if n + 2 not in fences]
    assert not stray, f"readme-test markers not on the line before a block: lines {stray}"
    bad = [n + 1 for n in markers if not MARKER.fullmatch(lines[n].strip())]
    assert not bad, f"malformed readme-test markers (expected '<!-- readme-test: skip (reason) -->'): {bad}"


def test_parser_finds_blocks_markers_and_languages():
    text = "a\n```python\nx = 1\n```\n<!-- readme-test: skip (needs a GPU) -->\n```bash\ndinolab models\n```\n"
    a, b = read_blocks(text)
    assert (a.lang, a.code, a.line, a.skip) == ("python", "x = 1\n", 2, None)
    assert (b.lang, b.code, b.line, b.skip) == ("bash", "dinolab models\n", 6, "needs a GPU")


# ----------------------------------------------------------------------------- python blocks

# Input placeholders the README leaves to the reader, keyed by a string that identifies the block.
PRELUDES = {
    "out.patch_map()": "import torch\nx = torch.randn(2, 3, 28, 42)\nbool_mask = torch.rand(2, 6) < 0.5\n",
    "segment(seg, x,": "import torch\nH, W = 30, 40\nx = torch.randn(1, 3, 28, 42)\n",
}

TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2, "img_size": 56}


def test_every_prelude_matches_one_block():
    for key in PRELUDES:
        assert sum(key in b.code for b in _of("python")) == 1, f"prelude key {key!r} must match exactly one block"


def _rgb(path: Path, size=(40, 30), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _tar(path: Path, files: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _seg_files(n: int, seed: int, classes: int) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    files = {}
    for i in range(n):
        files[f"images/{i:03d}.png"] = _png(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
        files[f"masks/{i:03d}.png"] = _png(rng.integers(0, classes, (30, 40), dtype=np.uint8))
    return files


def _depth_files(n: int, seed: int, prefix: str = "") -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    files = {}
    for i in range(n):
        files[f"{prefix}rgb/{i:03d}.png"] = _png(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
        files[f"{prefix}depth/{i:03d}.png"] = _png(rng.integers(500, 9000, (30, 40), dtype=np.uint16))
    return files


def _official_heads(weights: Path, embed_dim: int, depth: int) -> None:
    """Tiny heads under the official file names in the weights cache (so no download is tried)."""
    from dinolab.eval.depth_heads import build_head, make_head_config, save_depth_head
    from dinolab.eval.segmentation import PREFIX, LinearSegHead

    torch.manual_seed(0)
    head = LinearSegHead(4 * embed_dim, 150, n_layers=4)  # the ADE20K "ms" head reads 4 blocks
    sd = {PREFIX + k: v for k, v in head.state_dict().items()}
    torch.save({"state_dict": sd, "meta": {}}, weights / "dinov2_vits14_ade20k_ms_head.pth")
    cfg = make_head_config("lin4", embed_dim, depth, max_depth=10.0)
    save_depth_head(build_head(cfg), cfg, weights / "dinov2_vits14_nyu_linear4_head.pth")


@pytest.fixture
def readme_env(tmp_path, monkeypatch):
    """A temporary working folder with what the README's Python blocks name; see the module docstring."""
    import dinolab
    import dinolab.models
    import dinolab.models.checkpoints as ckpts
    from dinolab.models.variants import get_variant

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    for i in range(3):
        _rgb(tmp_path / "photos" / f"p{i}.jpg", seed=i)
    _rgb(tmp_path / "room.jpg", seed=9)
    monkeypatch.setenv("DINOLAB_OFFLINE", "1")
    monkeypatch.setenv("DINOLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no torch.hub cache of this machine
    shared = tmp_path / "shared"
    monkeypatch.setenv("DINOLAB_CAMVID", str(shared / "camvid"))
    monkeypatch.setenv("DINOLAB_DEPTH_DATA", str(shared))
    _tar(shared / "camvid" / "train.tar.gz", _seg_files(3, 0, 11))
    _tar(shared / "camvid" / "val.tar.gz", _seg_files(2, 1, 11))
    _tar(shared / "sevenscenes_redkitchen" / "train.tar.gz", _depth_files(3, 2))
    _tar(shared / "sevenscenes_redkitchen" / "val.tar.gz", _depth_files(2, 3))
    _tar(shared / "depth_samples_nyu_kitti" / "samples.tar.gz",
         {**_depth_files(2, 4, "nyu/"), **_depth_files(2, 5, "kitti/")})
    weights = ckpts.cache_dir()
    weights.mkdir(parents=True, exist_ok=True)
    _official_heads(weights, TINY["embed_dim"], TINY["depth"])

    real = ckpts.load_model

    def load_model(name_or_path, *args, **kwargs):
        try:
            variant = get_variant(str(name_or_path))
        except KeyError:
            variant = None
        if variant is None or not variant.url or kwargs.get("weights"):
            return real(name_or_path, *args, **kwargs)
        torch.manual_seed(0)  # an official name: a random model of its kind, tiny
        model = dinolab.models.DinoVisionTransformer(**get_variant(variant.name, **TINY).model_kwargs())
        return model.to(kwargs["device"]).eval() if kwargs.get("device") else model.eval()

    for module in (dinolab, dinolab.models, ckpts):
        monkeypatch.setattr(module, "load_model", load_model)
    return tmp_path


@pytest.mark.parametrize("block", _of("python"), ids=lambda b: b.id)
def test_python_block_runs(block, readme_env, one_thread):
    if block.skip:
        pytest.skip(f"README.md line {block.line}: {block.skip}")
    ns: dict = {"__name__": "__readme__"}
    for key, prelude in PRELUDES.items():
        if key in block.code:
            exec(compile(prelude, f"prelude of README.md:{block.line}", "exec"), ns)
    exec(compile(block.code, f"README.md:{block.line}", "exec"), ns)


# ------------------------------------------------------------------------------- bash blocks


def _commands(code: str) -> list[list[str]]:
    """Shell commands of a block as token lists: continuations joined, comments dropped, split at ``;``."""
    out = []
    for line in re.sub(r"\\\n\s*", " ", code).splitlines():
        cmd: list[str] = []
        for tok in shlex.split(line, comments=True) + [";"]:
            if tok == ";":
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(tok)
    return out


def _dinolab_argv(tokens: list[str]) -> list[str] | None:
    """The arguments after ``dinolab`` (also ``torchrun ... -m dinolab``), else None."""
    if tokens and tokens[0] == "dinolab":
        return tokens[1:]
    if tokens and tokens[0] == "torchrun" and "-m" in tokens:
        i = tokens.index("-m")
        return tokens[i + 2:] if tokens[i + 1:i + 2] == ["dinolab"] else None
    return None


def _units(argv: list[str]) -> list[list[list[str]]]:
    """Positions of a documented command, each a list of alternatives (token lists)."""
    units, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("["):  # an optional group, to its closing "]", alternatives split at " | "
            depth, group = 0, []
            while True:
                depth += argv[i].count("[") - argv[i].count("]")
                group.append(argv[i])
                if depth <= 0:
                    break
                i += 1
            inner = " ".join(group)[1:-1].split()
            alts, cur = [], []
            for t in inner:
                if t == "|":
                    alts.append(cur)
                    cur = []
                else:
                    cur.append(t)
            units.append([v for alt in alts + [cur] for v in _variants(alt)])
        elif "|" in tok and not tok.startswith("|"):
            units.append([[a] for a in tok.split("|")])
        else:
            units.append([[tok]])
        i += 1
    return units


def _variants(argv: list[str]) -> list[list[str]]:
    """Concrete argument lists of a documented command: ``[...]`` groups kept (without brackets),
    ``a|b`` tokens and ``[x | y]`` groups give one list per alternative (the others at their first)."""
    units = _units(argv)

    def pick(choice: dict[int, int]) -> list[str]:
        return [t for k, alts in enumerate(units) for t in alts[choice.get(k, 0)]]

    return [pick({})] + [pick({k: j}) for k, alts in enumerate(units) for j in range(1, len(alts))]


def _subparser(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """Walk the subcommands named at the start of ``argv``; returns the innermost parser and the rest."""
    while argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or argv[0] not in subs[0].choices:
            break
        parser, argv = subs[0].choices[argv[0]], argv[1:]
    return parser, argv


def _check_dinolab(argv: list[str], where: str, capsys) -> None:
    from dinolab.cli import build_parser

    elided = "..." in argv
    argv = [t for t in argv if t != "..."]
    for args in _variants(argv):
        if elided:  # "..." stands for arguments given above: check the command and option names only
            sub, rest = _subparser(build_parser(), args)
            assert sub.prog != "dinolab", f"{where}: {args[:2]} is not a dinolab command"
            known = sub._option_string_actions
            unknown = [t.split("=")[0] for t in rest if t.startswith("-") and t.split("=")[0] not in known]
            assert not unknown, f"{where}: {sub.prog} has no options {unknown}"
            continue
        try:
            ns = build_parser().parse_args(args)
        except SystemExit as e:
            pytest.fail(f"{where}: `dinolab {shlex.join(args)}` does not parse: {capsys.readouterr().err.strip()} "
                        f"(exit {e.code})")
        assert callable(getattr(ns, "func", None)), f"{where}: `dinolab {shlex.join(args)}` names no command"


@functools.lru_cache(maxsize=1)
def _app_paths() -> frozenset[str]:
    from dinolab.models import create_model
    from dinolab.serve.app import create_app
    from dinolab.serve.registry import ServedModel

    app = create_app(models=[ServedModel.wrap(create_model("vit_tiny_patch4", depth=1), short_side=32)])
    return frozenset(r.path for r in app.routes)


@pytest.mark.parametrize("block", _of("bash"), ids=lambda b: b.id)
def test_bash_block_commands_parse(block, capsys):
    if block.skip:
        pytest.skip(f"README.md line {block.line}: {block.skip}")
    root = README.parent
    checked = 0
    for tokens in _commands(block.code):
        where = f"README.md block at line {block.line}, `{shlex.join(tokens)}`"
        argv = _dinolab_argv(tokens)
        if argv is not None:
            _check_dinolab(argv, where, capsys)
        elif tokens[0].startswith("./"):
            script = root / tokens[0]
            assert script.is_file() and os.access(script, os.X_OK), f"{where}: {tokens[0]} is not an executable file"
        elif tokens[0] == "curl":
            url = next(t for t in tokens if t.startswith("http"))
            path = re.sub(r"^https?://[^/]+", "", url).split("?")[0]
            assert path in _app_paths(), f"{where}: the server has no route {path}"
        else:
            pytest.fail(f"{where}: the test does not know how to check `{tokens[0]}` lines")
        checked += 1
    assert checked, f"README.md block at line {block.line} has no command"


def test_bash_variants_expand_alternatives_and_groups():
    got = _variants(["eval", "knn|linear", "--x", "[--ms", "|", "--scales", "1", "2]", "[--kind", "a|b]"])
    assert got == [["eval", "knn", "--x", "--ms", "--kind", "a"], ["eval", "linear", "--x", "--ms", "--kind", "a"],
                   ["eval", "knn", "--x", "--scales", "1", "2", "--kind", "a"],
                   ["eval", "knn", "--x", "--ms", "--kind", "b"]]
    assert _commands("a b \\\n   c  # note\nd ; e\n") == [["a", "b", "c"], ["d"], ["e"]]


def test_a_wrong_command_fails_the_bash_check(capsys):
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        _check_dinolab(["embed", "photos/", "--no-such-flag"], "here", capsys)
    with pytest.raises(AssertionError, match="has no options"):
        _check_dinolab(["embed", "--no-such-flag", "..."], "here", capsys)


# ------------------------------------------------------------------------------- yaml blocks


@pytest.mark.parametrize("block", _of("yaml"), ids=lambda b: b.id)
def test_yaml_block_is_a_valid_serve_config(block, tmp_path):
    from dinolab.serve.settings import load_settings

    if block.skip:
        pytest.skip(f"README.md line {block.line}: {block.skip}")
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(block.code)
    settings = load_settings(cfg)
    assert settings.models, "the README's serve.yaml names no model"
