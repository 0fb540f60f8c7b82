"""Weight loading: offline download from a local mirror, SHA-256 records, every supported layout,
architecture inference, the ``save_official`` sidecar, and refusal of unsafe or ill-fitting files.

Everything runs on CPU with depth-1 models; no network (the "download" is served from a local
``http.server`` or a ``file://`` URL).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dinolab.errors import ChecksumError, DinolabError, WeightsNotFoundError
from dinolab.models import create_model, get_variant
from dinolab.models.checkpoints import (
    download_weights,
    infer_variant,
    load_model,
    save_hf_folder,
    save_official,
    sha256_of,
)
from dinolab.models.convert import official_to_timm

FILENAME = "dinov2_vits14_pretrain.pth"
URL_PATH = f"/dinov2_vits14/{FILENAME}"


def randomized(name: str, seed: int = 0, **overrides):
    """Our model with every parameter random (LayerScale ~ 1, not 1e-5, so the block matters)."""
    model = create_model(name, **overrides).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if k.endswith("gamma") or ("norm" in k and k.endswith("weight")):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.05 * noise)
    return model


def image(h: int, w: int) -> torch.Tensor:
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))


X224 = image(224, 224)  # 16 x 16 grid: position embeddings are resized
X518 = image(518, 518)  # the stored 37 x 37 grid: no resize, whatever the interpolation settings


def assert_same_outputs(model, reference, x):
    """Bit-identical tokens (same weights, same kernels)."""
    with torch.no_grad():
        a, b = model(x), reference(x)
    for field in ("cls_token", "register_tokens", "patch_tokens"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=0)


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def source():
    """A depth-1 ViT-S/14 and its weights in the exact official layout (plain dict, torch.save)."""
    return randomized("dinov2_vits14", depth=1)


@pytest.fixture(scope="module")
def served_root(source, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mirror")
    (root / "dinov2_vits14").mkdir()
    torch.save(dict(source.state_dict()), root / "dinov2_vits14" / FILENAME)
    return root


@pytest.fixture
def official_file(served_root) -> Path:
    return served_root / "dinov2_vits14" / FILENAME


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Empty dinolab cache and torch.hub cache; no mirror or offline flag from the outer environment."""
    cache, hub = tmp_path / "cache", tmp_path / "hub"
    monkeypatch.setenv("DINOLAB_CACHE", str(cache))
    monkeypatch.delenv("DINOLAB_WEIGHTS_MIRROR", raising=False)
    monkeypatch.delenv("DINOLAB_OFFLINE", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return SimpleNamespace(weights=cache / "weights", hub=hub, dest=cache / "weights" / FILENAME)


def _serve(root: Path):
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop():
        if thread.is_alive():
            server.shutdown()
            thread.join()
            server.server_close()

    return SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}", requests=requests, stop=stop)


@pytest.fixture
def mirror(served_root, env, monkeypatch):
    """Local HTTP mirror of dl.fbaipublicfiles.com/dinov2 serving the official-format file."""
    srv = _serve(served_root)
    monkeypatch.setenv("DINOLAB_WEIGHTS_MIRROR", srv.url)
    yield srv
    srv.stop()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --------------------------------------------------------------------------- 1. download, offline


def test_download_once_then_load_from_cache(mirror, env, source, official_file):
    model = load_model("dinov2_vits14", depth=1, progress=False)
    assert mirror.requests == [URL_PATH]
    assert env.dest.read_bytes() == official_file.read_bytes()
    record = (env.weights / (FILENAME + ".sha256")).read_text().split()
    assert record == [sha256_of(official_file), FILENAME]
    assert files_in(env.weights) == [FILENAME, FILENAME + ".sha256"]  # no .part / .tmp leftovers
    assert_same_outputs(model, source, X224)

    again = load_model("vit_small_patch14_dinov2", depth=1)  # timm alias, same file: from the cache
    assert mirror.requests == [URL_PATH]
    mirror.stop()
    assert_same_outputs(again, source, X224)
    assert_same_outputs(load_model("dinov2_vits14", depth=1), source, X224)


def test_torch_hub_cache_is_used_without_download(mirror, env, source, official_file):
    hub_file = env.hub / "checkpoints" / FILENAME
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(official_file.read_bytes())
    assert_same_outputs(load_model("dinov2_vits14", depth=1), source, X224)
    assert mirror.requests == []
    assert files_in(env.weights) == []


def test_file_url_download(official_file, tmp_path):
    dest = tmp_path / "dl" / "w.pth"
    assert download_weights(official_file.as_uri(), dest, progress=False) == dest
    assert dest.read_bytes() == official_file.read_bytes()
    assert (tmp_path / "dl" / "w.pth.sha256").read_text().split()[0] == sha256_of(official_file)

    other = tmp_path / "bad" / "w.pth"
    with pytest.raises(ChecksumError) as err:
        download_weights(official_file.as_uri(), other, sha256="f" * 64, progress=False)
    assert_one_line(err)
    assert files_in(other.parent) == []


def test_file_url_mirror(served_root, env, source, monkeypatch):
    monkeypatch.setenv("DINOLAB_WEIGHTS_MIRROR", served_root.as_uri() + "/")
    assert_same_outputs(load_model("dinov2_vits14", depth=1, progress=False), source, X224)
    assert env.dest.is_file()


def _serve_bad(body: bytes, content_length: int, content_type: str):
    """A server that answers every GET with status 200, ``content_length`` declared, ``body`` sent."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(content_length))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.parametrize("case", ["truncated", "html"])
def test_bad_transfer_is_not_cached(case, env, official_file, monkeypatch, capsys):
    """A cut transfer or an HTML page with status 200 is neither renamed into the cache nor pinned,
    and ``dinolab download`` exits non-zero."""
    from dinolab.cli import main

    data = official_file.read_bytes()
    html = b"<html><body>Service unavailable</body></html>"
    body, length, kind, expect = {
        "truncated": (data[:100_000], len(data), "application/octet-stream", f"100000 of {len(data)} bytes"),
        "html": (html, len(html), "text/html; charset=utf-8", "server sent text/html"),
    }[case]
    server, thread, url = _serve_bad(body, length, kind)
    try:
        with pytest.raises(DinolabError, match=expect) as err:
            download_weights(f"{url}{URL_PATH}", env.dest, progress=False)
        assert "nothing was cached" in assert_one_line(err)
        assert files_in(env.weights) == []  # no file, no .sha256, no .part
        monkeypatch.setenv("DINOLAB_WEIGHTS_MIRROR", url)
        assert main(["download", "dinov2_vits14"]) != 0
        assert expect in capsys.readouterr().err
        assert files_in(env.weights) == []
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


# --------------------------------------------------------------------------- 2. checksums


def test_wrong_pinned_sha256_refuses_download(mirror, env):
    with pytest.raises(ChecksumError) as err:
        load_model("dinov2_vits14", depth=1, sha256="0" * 64, progress=False)
    assert_one_line(err)
    assert mirror.requests == [URL_PATH]
    assert files_in(env.weights) == []  # neither the file, nor a record, nor a partial download


def test_tampered_cached_file_is_refused(mirror, env):
    load_model("dinov2_vits14", depth=1, progress=False)
    data = bytearray(env.dest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    env.dest.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as err:
        load_model("dinov2_vits14", depth=1)
    assert str(env.dest) in assert_one_line(err)
    assert mirror.requests == [URL_PATH]  # refused, not silently re-downloaded


def test_pinned_sha256(mirror, env, source, official_file):
    digest = sha256_of(official_file)
    assert_same_outputs(load_model("dinov2_vits14", depth=1, sha256=digest, progress=False), source, X224)
    assert_same_outputs(load_model("dinov2_vits14", depth=1, sha256=digest.upper()), source, X224)
    assert mirror.requests == [URL_PATH]
    with pytest.raises(ChecksumError):  # a pin is checked against the cached file too
        load_model("dinov2_vits14", depth=1, sha256="1" * 64)
    with pytest.raises(ChecksumError):  # ... and against an explicit weights file
        load_model("dinov2_vits14", weights=official_file, depth=1, sha256="1" * 64)
    model = load_model("dinov2_vits14", weights=official_file, depth=1, sha256=digest)
    assert_same_outputs(model, source, X224)


# --------------------------------------------------------------------------- 3. not cached, no download


@pytest.mark.parametrize("how", ["closed_port", "offline_flag", "http_404"])
def test_missing_weights_say_what_to_do(how, env, monkeypatch, tmp_path):
    srv = None
    if how == "closed_port":
        monkeypatch.setenv("DINOLAB_WEIGHTS_MIRROR", closed_port_url())
    else:
        empty = tmp_path / "empty"
        empty.mkdir()
        srv = _serve(empty)
        monkeypatch.setenv("DINOLAB_WEIGHTS_MIRROR", srv.url)
        if how == "offline_flag":
            monkeypatch.setenv("DINOLAB_OFFLINE", "1")
    fds = open_fds()
    try:
        for _ in range(3):
            with pytest.raises(WeightsNotFoundError) as err:
                load_model("dinov2_vits14", progress=False)
    finally:
        if srv:
            srv.stop()
    msg = assert_one_line(err)
    url = os.environ["DINOLAB_WEIGHTS_MIRROR"] + URL_PATH
    assert url in msg and str(env.dest) in msg and "--weights" in msg, msg
    assert isinstance(err.value, FileNotFoundError)
    assert files_in(env.weights) == []
    assert open_fds() <= fds  # a failed download leaks no file descriptor
    if how == "offline_flag":
        assert srv.requests == []


# --------------------------------------------------------------------------- 4. layouts


def test_local_official_file_infers_architecture(official_file, source):
    model = load_model(official_file)  # no arch: from the shapes
    assert (model.embed_dim, len(model.blocks), model.num_heads) == (384, 1, 384 // 64)
    assert model.num_register_tokens == 0
    assert_same_outputs(model, source, X518)
    assert_same_outputs(load_model(official_file, arch="dinov2_vits14", depth=1), source, X224)


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vitb14_reg", "dinov2_vitl14", "dinov2_vitg14_reg"])
def test_infer_variant_from_shapes(name):
    with torch.device("meta"):
        full = create_model(name).state_dict()
        reduced = create_model(name, depth=2).state_dict()
    assert infer_variant(full).name == name
    v, official = infer_variant(reduced), get_variant(name)
    assert v.name.startswith("custom") and v.url is None
    assert (v.embed_dim, v.depth, v.num_heads) == (official.embed_dim, 2, official.embed_dim // 64)
    assert (v.ffn, v.ffn_hidden, v.num_register_tokens) == (
        official.ffn, official.ffn_hidden or 4 * official.embed_dim, official.num_register_tokens)
    assert infer_variant(reduced, num_heads=4).num_heads == 4


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_hf_folder(name, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    src = randomized(name, depth=1)
    folder = save_hf_folder(src, tmp_path / "hf")
    model = load_model(folder)
    assert (len(model.blocks), model.num_heads, model.num_register_tokens) == (1, 6, src.num_register_tokens)
    assert_same_outputs(model, src, X518)
    assert_same_outputs(load_model(folder, arch=name, depth=1), src, X224)

    reg = src.num_register_tokens > 0
    cls = transformers.Dinov2WithRegistersModel if reg else transformers.Dinov2Model
    hf = cls.from_pretrained(folder, attn_implementation="eager").eval()
    if not reg:  # HF's no-register resize is not the official one (see test_parity): use the official one
        from tests.models.test_vit import official_pos_resize

        emb = hf.embeddings
        monkeypatch.setattr(emb, "interpolate_pos_encoding", lambda e, h, w: official_pos_resize(
            emb.position_embeddings, h // 14, w // 14, offset=0.1, antialias=False))
    with torch.no_grad():
        theirs = hf(pixel_values=X224).last_hidden_state[:, 0]
        torch.testing.assert_close(theirs, src(X224).cls_token, rtol=0, atol=1e-4)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_timm_state_dict(name, suffix, tmp_path):
    from safetensors.torch import save_file

    src = randomized(name, depth=1)
    sd = {k: v.detach().clone().contiguous() for k, v in official_to_timm(src.state_dict()).items()}
    assert "mask_token" not in sd and ("reg_token" in sd) == name.endswith("_reg")
    path = tmp_path / f"timm{suffix}"
    torch.save(sd, path) if suffix == ".pth" else save_file(sd, str(path))
    model = load_model(path)
    assert (len(model.blocks), model.num_heads, model.num_register_tokens) == (1, 6, src.num_register_tokens)
    assert_same_outputs(model, src, X518)
    assert_same_outputs(load_model(name, weights=path, depth=1), src, X224)
    assert_same_outputs(load_model(get_variant(name).aliases[0], weights=path, depth=1), src, X224)


@pytest.mark.parametrize("wrap", ["teacher", "ddp"])
def test_training_checkpoint(wrap, source, tmp_path):
    sd = source.state_dict()
    if wrap == "teacher":  # DINOv2 training checkpoint: heads next to the backbone, student beside
        teacher = {f"backbone.{k}": v for k, v in sd.items()}
        teacher.update({"dino_head.mlp.0.weight": torch.randn(8, 384), "ibot_head.last_layer.weight_g":
                        torch.randn(8, 1)})
        ckpt = {"teacher": teacher, "student": {"backbone.cls_token": torch.zeros(1, 1, 384)}, "iteration": 7}
    else:
        ckpt = {"model": {f"module.backbone.{k}": v for k, v in sd.items()}, "epoch": 3}
    path = tmp_path / "training_0007.pth"
    torch.save(ckpt, path)
    assert_same_outputs(load_model(path), source, X518)
    assert_same_outputs(load_model("dinov2_vits14", weights=path, depth=1), source, X224)


@pytest.mark.parametrize("name,overrides", [("dinov2_vits14", {}), ("dinov2_vits14_reg", {}),
                                            ("vit_small_patch14", {"num_heads": 3})])
def test_save_official_round_trip(name, overrides, tmp_path):
    src = randomized(name, depth=1, **overrides)
    path = save_official(src, tmp_path / "out" / "model.pth")
    assert files_in(path.parent) == ["model.pth", "model.pth.json"]
    assert set(torch.load(path, weights_only=True)) == set(src.state_dict())  # official keys, nothing else
    model = load_model(path)
    for attr in ("num_heads", "interpolate_offset", "interpolate_antialias", "num_register_tokens"):
        assert getattr(model, attr) == getattr(src, attr), attr
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert_same_outputs(model, src, X224)  # resized position embeddings: the settings round-tripped
    assert_same_outputs(model, src, image(266, 378))


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_without_sidecar_the_official_rule_of_its_kind(name, tmp_path, caplog):
    """A reduced official model (1 block: no official variant) given by path alone, no sidecar:
    without registers the official default (offset 0.1, no antialias), with registers the register
    models' rule; outputs at a non-native size equal those of the same weights built with that rule."""
    src = randomized(name, depth=1)
    path = save_official(src, tmp_path / "m.pth")
    path.with_name("m.pth.json").unlink()
    with caplog.at_level("INFO", logger="dinolab.models.checkpoints"):
        model = load_model(path)
    regs = name.endswith("_reg")
    assert (model.interpolate_offset, model.interpolate_antialias) == ((0.0, True) if regs else (0.1, False))
    assert (src.interpolate_offset, src.interpolate_antialias) == (model.interpolate_offset,
                                                                   model.interpolate_antialias)
    assert_same_outputs(model, src, image(266, 378))  # 19 x 27 grid: resized
    rule = "register tokens: the register models'" if regs else "no register tokens: the official default"
    assert f"offset {model.interpolate_offset:g}, antialias {model.interpolate_antialias} (from {rule}" \
        in caplog.text


def test_the_sidecar_rule_wins(tmp_path):
    """A sidecar's interpolation settings are used even where they differ from the inferred rule."""
    own = randomized("vit_small_patch14", depth=1, num_heads=6)  # own variants: offset 0, antialias
    path = save_official(own, tmp_path / "m.pth")
    model = load_model(path)
    assert (model.interpolate_offset, model.interpolate_antialias) == (0.0, True)
    assert_same_outputs(model, own, image(266, 378))


# --------------------------------------------------------------------------- 5. safety, misfits


def _touch(path):
    Path(path).write_text("pwned")
    return path


class Payload:
    """Unpickling this runs ``_touch``: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (_touch, (self.path,))


def test_pickled_code_is_refused_not_run(source, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({**source.state_dict(), "x": Payload(marker)}, path)
    for call in (lambda: load_model(path), lambda: load_model("dinov2_vits14", weights=path, depth=1)):
        with pytest.raises(DinolabError) as err:
            call()
        assert str(path) in assert_one_line(err)
        assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really is armed: unsafe loading runs it
    assert marker.exists()


@pytest.mark.parametrize("name,overrides,expect", [
    ("dinov2_vitb14", {"depth": 1}, "size mismatch"),
    ("dinov2_vits14", {"depth": 2}, "Missing key"),
    ("dinov2_vits14_reg", {"depth": 1}, "Missing key"),
])
def test_weights_that_do_not_fit(name, overrides, expect, official_file):
    with pytest.raises(DinolabError) as err:
        load_model(name, weights=official_file, **overrides)
    msg = assert_one_line(err)
    assert expect in msg and name in msg, msg


@pytest.mark.parametrize("content", ["unrelated_keys", "empty_dict", "bare_tensor", "list"])
def test_not_a_backbone_checkpoint(content, tmp_path):
    obj = {"unrelated_keys": {"foo.weight": torch.zeros(2)}, "empty_dict": {}, "bare_tensor": torch.zeros(3),
           "list": [torch.zeros(1)]}[content]
    path = tmp_path / "x.pth"
    torch.save(obj, path)
    with pytest.raises(DinolabError) as err:
        load_model(path)
    assert str(path) in assert_one_line(err)


def _tiny_sd(**kw):
    from dinolab.models import DinoVisionTransformer

    return DinoVisionTransformer(**{"embed_dim": 192, "depth": 1, "num_heads": 3, "patch_size": 4,
                                    "img_size": 16, **kw}).state_dict()


@pytest.mark.parametrize("case", ["width_100000", "width_not_divisible", "sidecar_width_100000"])
def test_shapes_of_no_architecture(case, tmp_path):
    """Shapes no model has: one DinolabError naming the file (not a ValueError from the constructor,
    and no 100000-wide model allocated)."""
    path = tmp_path / "odd.pth"
    if case == "width_100000":
        sd = {**_tiny_sd(), "cls_token": torch.zeros(1, 1, 100_000)}
    else:
        sd = _tiny_sd(embed_dim=200, num_heads=5)  # a real model, but 200 / 64 -> 3 heads guessed
    torch.save(sd, path)
    if case == "sidecar_width_100000":
        save_official(create_model("vit_tiny_patch4", depth=1, img_size=16), path)
        arch = json.loads(path.with_name("odd.pth.json").read_text())
        path.with_name("odd.pth.json").write_text(json.dumps({**arch, "embed_dim": 100_000}))
    with pytest.raises(DinolabError) as err:
        load_model(path)
    msg = assert_one_line(err)
    assert str(path) in msg and "no model can be built" in msg, msg
    if case == "width_not_divisible":
        assert "not divisible" in msg and "num_heads=" in msg
        assert load_model(path, num_heads=5).num_heads == 5


@pytest.mark.parametrize("text,expect", [
    ("{not json", "cannot read .* as JSON"),
    ("[1, 2]", "JSON list, not an object"),
    ('{"name": "x", "embed_dim": "192", "depth": 1, "num_heads": 3}', "wrong values.*embed_dim='192'"),
    ('{"name": "x", "embed_dim": 192, "depth": 1, "num_heads": true}', "wrong values.*num_heads=True"),
    ('{"name": "x", "embed_dim": 192, "depth": 0, "num_heads": 3}', "wrong values.*depth=0"),
    ('{"name": "x", "embed_dim": 192, "depth": 1, "num_heads": 3, "ffn": "relu"}', "ffn='relu'"),
    ('{"name": "x", "embed_dim": 192, "depth": 1, "num_heads": 3, "interpolate_antialias": "yes"}',
     "interpolate_antialias='yes'"),
    ('{"name": "x", "embed_dim": 192, "depth": 1, "heads": 3}',
     r"unknown fields \['heads'\].*missing \['num_heads'\]"),
])
def test_bad_sidecar(text, expect, tmp_path):
    path = save_official(create_model("vit_tiny_patch4", depth=1, img_size=16), tmp_path / "m.pth")
    path.with_name("m.pth.json").write_text(text)
    with pytest.raises(DinolabError, match=expect) as err:
        load_model(path)
    assert str(path) + ".json" in assert_one_line(err)


@pytest.mark.parametrize("content", [b"", b"\xff" * 8 + b"{}", (12).to_bytes(8, "little") + b"{not json!!}",
                                     (10 ** 12).to_bytes(8, "little") + b"{}"])
def test_bad_safetensors_header(content, tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(content)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(content)
    for source, named in ((path, path), (folder, folder / "model.safetensors")):
        with pytest.raises(DinolabError, match="cannot read .* as a safetensors file") as err:
            load_model(source)
        assert str(named) in assert_one_line(err)


def test_bad_hf_config(tmp_path):
    folder = save_hf_folder(create_model("vit_tiny_patch4", depth=1, img_size=16), tmp_path / "hf")
    for text, expect in (("{oops", "cannot read .*config.json as JSON"),
                         ('{"num_attention_heads": "3"}', "config.json: num_attention_heads must be")):
        (folder / "config.json").write_text(text)
        with pytest.raises(DinolabError, match=expect) as err:
            load_model(folder)
        assert_one_line(err)


def test_missing_path(tmp_path):
    with pytest.raises(WeightsNotFoundError) as err:
        load_model(tmp_path / "nope.pth")
    assert_one_line(err)
    with pytest.raises(WeightsNotFoundError):
        load_model("dinov2_vits14", weights=tmp_path / "nope.pth")


def test_backbone_without_layerscale_round_trips(tmp_path):
    """A model pretrained with model.layerscale=null has no ls*.gamma keys: it loads from the
    sidecar-described file and from the bare .pth (architecture inferred from the keys)."""
    from dinolab.models import DinoVisionTransformer, create_model, load_model, save_official

    kw = create_model("vit_tiny_patch14", depth=2, img_size=56).state_dict()
    assert "blocks.0.ls1.gamma" in kw
    torch.manual_seed(0)
    model = DinoVisionTransformer(embed_dim=192, depth=2, num_heads=3, patch_size=14, img_size=56, layerscale=None)
    assert not any("gamma" in k for k in model.state_dict())
    path = save_official(model.eval(), tmp_path / "nols.pth")
    x = torch.randn(1, 3, 56, 56)
    want = model(x).cls_token
    torch.testing.assert_close(load_model(path)(x).cls_token, want)
    path.with_name("nols.pth.json").unlink()
    torch.testing.assert_close(load_model(path)(x).cls_token, want)


@pytest.mark.parametrize("reg", [False, True], ids=["noreg", "reg4"])
def test_hf_export_says_where_it_matches_transformers(reg, tmp_path, caplog):
    """The export warns (and records in dinolab_export.json) that transformers' no-register model
    matches only at the native size; the record is checked against transformers itself."""
    ours = randomized("vit_tiny_patch4_reg4" if reg else "vit_tiny_patch4", img_size=16, depth=1,
                      interpolate_offset=0.0 if reg else 0.1, interpolate_antialias=reg)
    with caplog.at_level("WARNING", logger="dinolab.models.checkpoints"):
        folder = save_hf_folder(ours, tmp_path / "hf")
    notes = json.loads((folder / "dinolab_export.json").read_text())
    assert notes["native_size"] == [16, 16] and notes["transformers_class"] == (
        "Dinov2WithRegistersModel" if reg else "Dinov2Model")
    if reg:
        assert notes["outputs_match_transformers"] == "at every input size"
        assert "dinolab_export" not in caplog.text
    else:
        assert notes["outputs_match_transformers"] == "at the native size 16x16 only"
        assert "at the native size 16x16 only" in caplog.text and "dinolab_export.json" in caplog.text
    transformers = pytest.importorskip("transformers")
    cls = transformers.Dinov2WithRegistersModel if reg else transformers.Dinov2Model
    hf = cls.from_pretrained(folder, attn_implementation="eager").eval()
    for side, same in ((16, True), (24, reg)):  # 1e-4: fp32 reordering across implementations
        x = image(side, side)
        with torch.no_grad():
            diff = (ours(x).patch_tokens - hf(pixel_values=x).last_hidden_state[:, 1 + 4 * reg:]).abs().max()
        assert (diff <= 1e-4) == same, (side, float(diff))
