"""Training data sources: tar shard members decode like the same files in a folder."""

import io
import tarfile

import numpy as np
from PIL import Image

from dinolab.train.data import TarMember, _decode, training_items


def _rotated_jpeg(path):
    """A 24 x 12 JPEG whose EXIF orientation 6 says: show it rotated 90 degrees clockwise (12 x 24)."""
    img = Image.fromarray(np.repeat(np.linspace(0, 255, 24, dtype=np.uint8)[None, :, None], 12, 0).repeat(3, 2))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, "JPEG", exif=exif.tobytes(), quality=95)
    return path


def test_shard_members_honour_the_exif_orientation_like_folders(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    _rotated_jpeg(folder / "rot.jpg")
    with tarfile.open(tmp_path / "shard.tar", "w") as tf:
        tf.add(folder / "rot.jpg", arcname="rot.jpg")
    (path,) = training_items(str(folder))
    (member,) = training_items(str(tmp_path / "shard.tar"))
    assert isinstance(member, TarMember)
    from_folder, from_shard = _decode(path), _decode(member)
    assert from_folder.size == (12, 24)  # upright: the orientation was applied
    assert np.array_equal(np.asarray(from_shard), np.asarray(from_folder))


def test_shard_link_members_are_not_training_items(tmp_path):
    shard = tmp_path / "shard.tar"
    data = (tmp_path / "a.jpg")
    _rotated_jpeg(data)
    with tarfile.open(shard, "w") as tf:
        tf.add(data, arcname="a.jpg")
        for kind, target in ((tarfile.SYMTYPE, "/etc/passwd"), (tarfile.LNKTYPE, "a.jpg")):
            link = tarfile.TarInfo(f"link{kind.decode()}.jpg")
            link.type, link.linkname = kind, target
            tf.addfile(link)
        info = tarfile.TarInfo("../up.jpg")  # read by offset, never written anywhere: harmless
        info.size = len(data.read_bytes())
        tf.addfile(info, io.BytesIO(data.read_bytes()))
    items = training_items(str(shard))
    assert [m.name for m in items] == ["a.jpg", "../up.jpg"]
    assert not (tmp_path.parent / "up.jpg").exists()
