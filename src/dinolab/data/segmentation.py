"""Semantic-segmentation datasets: (image, label mask) pairs from folders, archives and named layouts.

One loader, ``load_segmentation_folder``, reads every layout; the named datasets are option sets for it:

================  ==========================================  ===============================================
spec              files (relative to the root)                 options
================  ==========================================  ===============================================
folder / .tar.gz  ``images/<id>.jpg`` + ``masks/<id>.png``     ``dataset.json`` in the root, or arguments
``camvid:train``  ``train.tar.gz`` / ``val.tar.gz`` of the     11 classes, 255 = void (ignored), SegNet palette;
                  above, extracted once into the cache         root ``$DINOLAB_CAMVID`` or ``../shared/data/camvid``
``ade20k:train``  ``images/training/*.jpg`` +                  150 classes; mask value 0 = "other" -> ignored,
                  ``annotations/training/*.png`` (``val``:     1..150 -> 0..149 (``reduce_zero_label``);
                  ``validation``) of ``ADEChallengeData2016``  root ``$DINOLAB_ADE20K``
``voc2012:train`` ``JPEGImages/<id>.jpg`` +                    21 classes (0 = background), 255 = object
                  ``SegmentationClass/<id>.png``, ids from     boundaries (ignored); palette-mode PNGs hold the
                  ``ImageSets/Segmentation/train.txt``         class index; root ``$DINOLAB_VOC2012`` (``VOC2012``)
================  ==========================================  ===============================================

Masks are index PNGs (mode ``L``, ``P`` — the palette index is the class — ``I;16``) or RGB PNGs mapped
to classes through a colour table (``mask_format="rgb"``). ``dataset.json`` (optional, in a folder's
root) may hold ``classes``, ``palette`` (display colours, and the mask colours of RGB masks),
``mask_format``, ``ignore_index``, ``ignore_colors`` and ``reduce_zero_label``.

Everything that would make a metric silently wrong raises ``SegmentationError`` (a ``ValueError``)
naming the file: an image without its mask, a mask of another size than its image, a label value
that is neither a class nor the ignore index, an RGB colour not in the table, an empty dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from dinolab.data.datasets import TAR_SUFFIXES, _extract_once, _has_suffix, find_shared_data
from dinolab.data.images import IMAGE_EXTENSIONS, BadImageError, load_rgb
from dinolab.errors import DinolabError
from dinolab.viz.overlay import distinct_palette

logger = logging.getLogger(__name__)

Colour = tuple[int, int, int]

CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist"]
CAMVID_PALETTE: list[Colour] = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
                                (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0),
                                (0, 128, 192)]
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]


class SegmentationError(DinolabError, ValueError):
    """Bad segmentation input (files, labels, sizes); the message names the file and the fix."""


def voc_palette(n: int) -> list[Colour]:
    """The Pascal VOC colour map for ``n`` classes: bits of the class index spread over R, G, B."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for shift in range(7, -1, -1):  # lowest 3 bits of c go to the highest bit still free in r, g, b
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        out.append((r, g, b))
    return out


# ------------------------------------------------------------------------------------------- masks


def _check_values(mask: np.ndarray, num_classes: int, ignore_index: int, path: str, reduced: bool) -> None:
    values = np.unique(mask)
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
    if bad.size:
        hint = ("" if reduced else "; for ADE20K-style masks (0 = unlabelled) pass reduce_zero_label "
                "(--reduce-zero-label)")
        raise SegmentationError(f"{path}: label values {bad[:8].tolist()} are neither a class index in "
                                f"[0, {num_classes}) nor the ignore index {ignore_index}: pass the right classes "
                                f"(--classes / --num-classes) or ignore index (--ignore-index){hint}")


def _rgb_to_labels(rgb: np.ndarray, colours: dict[Colour, int], path: str) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int64 through the colour table; unknown colours raise."""
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    keys = np.array(sorted((r << 16) | (g << 8) | b for r, g, b in colours), dtype=np.int64)
    values = np.array([colours[((k >> 16) & 255, (k >> 8) & 255, k & 255)] for k in keys], dtype=np.int64)
    pos = np.clip(np.searchsorted(keys, code), 0, len(keys) - 1)
    unknown = keys[pos] != code
    if unknown.any():
        bad = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in np.unique(code[unknown])[:5].tolist()]
        raise SegmentationError(f"{path}: RGB mask colours {bad} are not in the palette: add them to the palette "
                                "(a class colour) or to ignore_colors")
    return values[pos]


def read_mask(path: str | os.PathLike, *, num_classes: int, ignore_index: int = 255,
              reduce_zero_label: bool = False, colours: dict[Colour, int] | None = None) -> np.ndarray:
    """Decode a label mask to (H, W) int64 class indices, ``ignore_index`` for unlabelled pixels.

    Index masks (``L``, ``P`` = palette index, ``I;16``/``I``, ``1``) are read as numbers; with
    ``colours`` (RGB masks) each pixel's colour is looked up. An RGB mask without ``colours`` is
    accepted only when it is grey (R = G = B), i.e. an index mask saved as RGB.
    ``reduce_zero_label`` maps 0 -> ignore and v -> v - 1 (ADE20K). Values that are neither classes
    nor ignore raise ``SegmentationError``.
    """
    path = os.fspath(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if colours is not None:
                mask = _rgb_to_labels(np.asarray(img.convert("RGB")), colours, path)
            elif mode in ("L", "P", "I", "I;16", "I;16L", "I;16B", "1"):
                mask = np.asarray(img).astype(np.int64)
            elif mode in ("RGB", "RGBA"):
                rgb = np.asarray(img.convert("RGB"))
                if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
                    raise SegmentationError(f"{path} is a colour (RGB) mask: give the class colours (palette with "
                                            "mask_format 'rgb' in dataset.json, or --palette) or save index PNGs")
                mask = rgb[..., 0].astype(np.int64)
            else:
                raise SegmentationError(f"{path}: mask mode {mode!r} is not supported; save masks as 8-bit "
                                        "index PNGs (mode L or P)")
    except (OSError, SyntaxError) as e:
        raise SegmentationError(f"{path}: cannot read the mask ({type(e).__name__}: {e})") from None
    if reduce_zero_label:
        zero = mask == 0
        mask = np.where(mask == ignore_index, ignore_index, mask - 1)
        mask[zero] = ignore_index
    _check_values(mask, num_classes, ignore_index, path, reduce_zero_label)
    return mask


# ----------------------------------------------------------------------------------------- dataset


@dataclass
class SegmentationDataset:
    """Image / mask file pairs and how to read the masks.

    Attributes:
        images, masks: paths, one pair per sample.
        ids: one id per sample (the image path relative to the images folder, without extension).
        classes: class names; label i is ``classes[i]``.
        palette: display colour of each class (overlays and legends).
        ignore_index: mask value of unlabelled pixels (never counted in loss or metrics).
        reduce_zero_label: 0 is "unlabelled" and the classes are 1..C in the files (ADE20K).
        colours: RGB masks: colour -> label (class index or ``ignore_index``); None for index masks.
        name: where the data came from (a spec string or a folder), for results files.
    """

    images: list[str]
    masks: list[str]
    ids: list[str]
    classes: list[str]
    palette: list[Colour]
    ignore_index: int = 255
    reduce_zero_label: bool = False
    colours: dict[Colour, int] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if not self.images:
            raise SegmentationError(f"segmentation dataset {self.name or '?'} has no images")
        if len(self.palette) < len(self.classes):
            raise SegmentationError(f"{self.name}: palette has {len(self.palette)} colours for {len(self.classes)} "
                                    "classes: give one colour per class")
        if 0 <= self.ignore_index < len(self.classes):
            raise SegmentationError(f"{self.name}: ignore_index {self.ignore_index} is a class index (there are "
                                    f"{len(self.classes)} classes): use a value >= the number of classes, e.g. 255")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def load_image(self, i: int) -> Image.Image:
        """Sample ``i``'s image, 8-bit RGB; an unreadable file raises ``SegmentationError``."""
        try:
            return load_rgb(self.images[i])
        except BadImageError as e:
            raise SegmentationError(f"{e.path}: cannot decode the image ({e.reason})") from None

    def load_mask(self, i: int) -> np.ndarray:
        """Sample ``i``'s labels: (H, W) int64, ``ignore_index`` where unlabelled."""
        return read_mask(self.masks[i], num_classes=self.num_classes, ignore_index=self.ignore_index,
                         reduce_zero_label=self.reduce_zero_label, colours=self.colours)

    def load(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """(image, labels) of sample ``i``; a mask of another size than its image raises."""
        img, mask = self.load_image(i), self.load_mask(i)
        if mask.shape != (img.height, img.width):
            raise SegmentationError(f"{self.masks[i]}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                                    f"{self.images[i]} is {img.width}x{img.height}: masks must match their images")
        return img, mask

    def subset(self, indices: Sequence[int]) -> SegmentationDataset:
        """The samples at ``indices``, in that order."""
        idx = list(indices)
        return replace(self, images=[self.images[i] for i in idx], masks=[self.masks[i] for i in idx],
                       ids=[self.ids[i] for i in idx])

    def fingerprint(self) -> str:
        """SHA-256 (first 16 hex) of ids, classes and label options: the same data hashes alike."""
        h = hashlib.sha256(json.dumps([self.ids, self.classes, self.ignore_index, self.reduce_zero_label]).encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        """JSON-friendly summary for results files."""
        return {"name": self.name, "n": len(self), "hash": self.fingerprint(), "classes": self.classes,
                "ignore_index": self.ignore_index, "reduce_zero_label": self.reduce_zero_label}


# ---------------------------------------------------------------------------------- folder loader


def _colour(c: Sequence[int], where: str) -> Colour:
    if len(c) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in c):
        raise SegmentationError(f"{where}: colours must be [r, g, b] with integers in 0..255, got {c!r}")
    return (int(c[0]), int(c[1]), int(c[2]))


def parse_classes(value: str | os.PathLike | Sequence[str] | None) -> dict:
    """Class options from ``--classes``: a comma list of names, a ``.txt`` file (one name per line) or a
    ``.json`` file in the ``dataset.json`` format. Returns the ``dataset.json``-style dict."""
    if value is None:
        return {}
    if not isinstance(value, (str, os.PathLike)):
        return {"classes": [str(v) for v in value]}
    path = Path(value)
    if path.suffix.lower() == ".json" and path.is_file():
        return json.loads(path.read_text())
    if path.suffix.lower() == ".txt" and path.is_file():
        return {"classes": [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]}
    if path.suffix.lower() in (".json", ".txt"):
        raise SegmentationError(f"class file {path} does not exist")
    return {"classes": [c.strip() for c in str(value).split(",") if c.strip()]}


def _find_images(folder: Path) -> dict[str, Path]:
    """id (path relative to ``folder`` without extension) -> image file, recursive, hidden skipped."""
    found: dict[str, Path] = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                rel = (Path(root) / f).relative_to(folder)
                key = rel.with_suffix("").as_posix()
                if key in found:
                    raise SegmentationError(f"{folder}: two images share the id {key!r} ({found[key].name}, {f})")
                found[key] = Path(root) / f
    return found


def _infer_num_classes(masks: list[str], ignore_index: int, reduce_zero_label: bool) -> int:
    top = -1
    for m in masks:
        with Image.open(m) as img:
            values = np.unique(np.asarray(img))
        values = values[values != ignore_index]
        if reduce_zero_label:
            values = values[values > 0] - 1
        if values.size:
            top = max(top, int(values.max()))
    if top < 0:
        raise SegmentationError(f"every pixel of the {len(masks)} masks is ignored: cannot infer the classes; "
                                "pass --classes")
    return top + 1


def load_segmentation_folder(
    root: str | os.PathLike, *, images_dir: str = "images", masks_dir: str = "masks", split_file: str | None = None,
    mask_suffix: str = ".png", classes: Sequence[str] | None = None, num_classes: int | None = None,
    palette: Sequence[Sequence[int]] | None = None, mask_format: str | None = None,
    ignore_index: int | None = None, ignore_colors: Sequence[Sequence[int]] | None = None,
    reduce_zero_label: bool | None = None, name: str | None = None, cache_dir: str | os.PathLike | None = None,
) -> SegmentationDataset:
    """Pairs ``<root>/<images_dir>/<id>.<ext>`` with ``<root>/<masks_dir>/<id><mask_suffix>``.

    ``root`` may be a ``.tar``/``.tar.gz`` of such a folder (extracted once into the cache).
    ``split_file`` (relative to root) lists the ids to use, one per line (Pascal VOC's ImageSets).
    Options not given come from ``<root>/dataset.json`` when present, else: ignore 255, index masks,
    classes inferred from the masks (``0`` .. ``max``; one pass over all masks), the VOC colours
    without its black.
    """
    root = Path(root)
    if root.is_file() and _has_suffix(root, TAR_SUFFIXES):
        root = _extract_once(root, cache_dir)
    if not root.is_dir():
        raise SegmentationError(f"segmentation dataset {root} does not exist (expected a folder with "
                                f"{images_dir}/ and {masks_dir}/, or a .tar.gz of one)")
    spec = json.loads((root / "dataset.json").read_text()) if (root / "dataset.json").is_file() else {}
    ignore_index = spec.get("ignore_index", 255) if ignore_index is None else ignore_index
    reduce_zero_label = bool(spec.get("reduce_zero_label", False) if reduce_zero_label is None else reduce_zero_label)
    mask_format = mask_format or spec.get("mask_format", "index")
    classes = list(classes) if classes is not None else spec.get("classes")
    palette = palette if palette is not None else spec.get("palette")
    ignore_colors = ignore_colors if ignore_colors is not None else spec.get("ignore_colors", [])
    if mask_format not in ("index", "rgb"):
        raise SegmentationError(f"mask_format must be 'index' or 'rgb', got {mask_format!r}")

    img_root, mask_root = root / images_dir, root / masks_dir
    for folder in (img_root, mask_root):
        if not folder.is_dir():
            raise SegmentationError(f"{root}: missing folder {folder.relative_to(root)}/ (expected "
                                    f"{images_dir}/<id>.jpg and {masks_dir}/<id>{mask_suffix}; see --images-dir, "
                                    "--masks-dir)")
    found = _find_images(img_root)
    if split_file is not None:
        lines = (root / split_file).read_text().splitlines()
        wanted = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
        missing = [w for w in wanted if w not in found]
        if missing:
            raise SegmentationError(f"{root / split_file}: ids without an image in {img_root}: {missing[:5]}")
        ids = wanted
    else:
        ids = sorted(found)
    if not ids:
        raise SegmentationError(f"no images in {img_root} ({', '.join(IMAGE_EXTENSIONS)}): the dataset is empty")
    masks = [mask_root / f"{i}{mask_suffix}" for i in ids]
    for i, m in zip(ids, masks):
        if not m.is_file():
            raise SegmentationError(f"image {found[i]} has no mask: expected {m}")

    colours = None
    if mask_format == "rgb":
        if palette is None:
            raise SegmentationError(f"{root}: RGB masks need the class colours: a palette (one [r, g, b] per class)")
        colours = {_colour(c, str(root)): k for k, c in enumerate(palette)}
        colours.update({_colour(c, str(root)): ignore_index for c in ignore_colors})
        num_classes = len(palette)
    if classes is None:
        n = num_classes or _infer_num_classes([str(m) for m in masks], ignore_index, reduce_zero_label)
        classes = [str(k) for k in range(n)]
        if num_classes is None:
            logger.info("%s: %d classes inferred from the masks (names 0..%d); pass --classes to name them",
                        root, n, n - 1)
    elif num_classes is not None and num_classes != len(classes):
        raise SegmentationError(f"{len(classes)} class names given but num_classes is {num_classes}")
    pal = [_colour(c, str(root)) for c in palette] if palette is not None else distinct_palette(len(classes))
    return SegmentationDataset(images=[str(found[i]) for i in ids], masks=[str(m) for m in masks], ids=ids,
                               classes=list(classes), palette=pal, ignore_index=ignore_index,
                               reduce_zero_label=reduce_zero_label, colours=colours, name=name or str(root))


# ---------------------------------------------------------------------------------- named datasets


def _shared_root(env: str, folder: str, root: str | os.PathLike | None) -> Path:
    """``root``, else ``$env``, else ``../shared/data/<folder>`` from the current folder or the repo."""
    if root is not None:
        return Path(root)
    if env in os.environ:
        return Path(os.environ[env])
    found, candidates = find_shared_data(folder)
    if found is not None:
        return found
    raise SegmentationError(f"{folder} not found: set {env}=<folder> (or pass --data-root); looked in "
                            + ", ".join(str(c.resolve()) for c in candidates))


_SPLITS = {"train": "train", "training": "train", "val": "val", "validation": "val", "test": "val"}


def load_camvid(split: str, root: str | os.PathLike | None = None, *,
                cache_dir: str | os.PathLike | None = None) -> SegmentationDataset:
    """CamVid (SegNet 11-class version): ``train`` (367) or ``val`` (233, SegNet's test split) from
    ``<root>/<split>.tar.gz``, extracted once into the cache. Masks: class index, 255 = void."""
    if _SPLITS.get(split) is None:
        raise SegmentationError(f"CamVid split must be 'train' or 'val', got {split!r}")
    folder = _shared_root("DINOLAB_CAMVID", "camvid", root)
    archive = folder / f"{_SPLITS[split]}.tar.gz"
    if not archive.is_file():
        raise SegmentationError(f"{folder} has no {archive.name}: put the CamVid archives there or set DINOLAB_CAMVID")
    return load_segmentation_folder(archive, classes=CAMVID_CLASSES, palette=CAMVID_PALETTE, ignore_index=255,
                                    name=f"camvid:{_SPLITS[split]}", cache_dir=cache_dir)


def load_ade20k(split: str, root: str | os.PathLike | None = None) -> SegmentationDataset:
    """ADE20K (SceneParsing, ``ADEChallengeData2016``): 150 classes, 0 = other -> ignored.

    Class names come from ``objectInfo150.txt`` (or ``.csv``) in the root when present."""
    if _SPLITS.get(split) is None:
        raise SegmentationError(f"ADE20K split must be 'train' or 'val', got {split!r}")
    folder = _shared_root("DINOLAB_ADE20K", "ade20k", root)
    sub = "training" if _SPLITS[split] == "train" else "validation"
    names = [str(k) for k in range(150)]
    for info in (folder / "objectInfo150.txt", folder / "objectInfo150.csv"):
        if info.is_file():  # columns Idx, Ratio, Train, Val, Name (tab or comma separated)
            rows = [ln.replace(",", "\t").split("\t") for ln in info.read_text().splitlines()[1:] if ln.strip()]
            names = [r[-1].strip().strip('"').split(";")[0] for r in rows][:150]
            break
    return load_segmentation_folder(folder, images_dir=f"images/{sub}", masks_dir=f"annotations/{sub}",
                                    classes=names, reduce_zero_label=True, ignore_index=255,
                                    palette=voc_palette(151)[1:], name=f"ade20k:{_SPLITS[split]}")


def load_voc2012(split: str, root: str | os.PathLike | None = None) -> SegmentationDataset:
    """Pascal VOC 2012 segmentation (``VOCdevkit/VOC2012``): 21 classes, 255 = boundary (ignored)."""
    if _SPLITS.get(split) is None:
        raise SegmentationError(f"VOC split must be 'train' or 'val', got {split!r}")
    folder = _shared_root("DINOLAB_VOC2012", "voc2012", root)
    return load_segmentation_folder(folder, images_dir="JPEGImages", masks_dir="SegmentationClass",
                                    split_file=f"ImageSets/Segmentation/{_SPLITS[split]}.txt", classes=VOC_CLASSES,
                                    palette=voc_palette(21), ignore_index=255, name=f"voc2012:{_SPLITS[split]}")


NAMED = {"camvid": load_camvid, "ade20k": load_ade20k, "voc2012": load_voc2012}


def resolve_segmentation_dataset(spec: str, *, root: str | os.PathLike | None = None, **options) -> SegmentationDataset:
    """``camvid:train``, ``ade20k:val``, ``voc2012:train`` ... (``root`` = the dataset folder), or a folder /
    ``.tar.gz`` for ``load_segmentation_folder`` (``options`` go to it)."""
    name, sep, split = spec.partition(":")
    if sep and name.lower() in NAMED and not Path(spec).exists():
        if options:
            raise SegmentationError(f"{spec} is a named dataset with fixed options; drop {sorted(options)} or point "
                                    "at its folder instead")
        return NAMED[name.lower()](split, root)
    if name.lower() in NAMED and not sep and not Path(spec).exists():
        raise SegmentationError(f"say which split: '{name}:train' or '{name}:val'")
    return load_segmentation_folder(spec, **options)
