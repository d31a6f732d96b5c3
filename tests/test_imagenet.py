"""The ImageNet source (igsm/data/imagenet.py; issue 31): a user's ILSVRC2012 train copy in either
official layout, read as class-labelled, ADM-centre-cropped chunks."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from igsm.data import check_dataset_spec, iter_imagenet

WNIDS = ["n01440764", "n01443537", "n02102040"]


def picture(seed, size):
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


@pytest.fixture
def tree(tmp_path):
    """Three classes of two PNG images each (losslessly stored), of sizes whose short side is 16: at
    image_size 16 ADM's crop resizes nothing, so the expected pixels are a plain slice."""
    root = tmp_path / "train"
    expected = {}
    for c, wnid in enumerate(WNIDS):
        (root / wnid).mkdir(parents=True)
        for i, size in enumerate(((24, 16), (16, 20))):  # (width, height)
            pixels = picture(10 * c + i, size)
            Image.fromarray(pixels).save(root / wnid / f"{wnid}_{i}.png")
            expected[(c, i)] = pixels
    (root / "LOC_synset_mapping.txt").write_text("not a class folder\n")  # ignored
    return root, expected


def as_tar(root, out):
    """ILSVRC2012_img_train.tar's layout: an outer tar of per-class tars <wnid>.tar."""
    with tarfile.open(out, "w") as outer:
        for wnid in reversed(WNIDS):  # stored out of order: labels come from sorted ids
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as inner:
                for path in sorted((root / wnid).iterdir(), reverse=True):
                    inner.add(path, arcname=path.name)
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = buffer.tell()
            buffer.seek(0)
            outer.addfile(info, buffer)
    return out


def test_class_folders_and_the_official_tar_give_the_same_labelled_centre_crops(tree, tmp_path):
    # Bugs caught: labels in the order found rather than by sorted WordNet id (a tar stores them in
    # any order), the crop offset off by one or taken from the wrong side, a chunk boundary losing
    # or repeating an image.
    root, expected = tree
    chunks = list(iter_imagenet(root, 16, chunk=4))
    assert [len(labels) for _, labels in chunks] == [4, 2]
    images = np.concatenate([c[0] for c in chunks])
    labels = np.concatenate([c[1] for c in chunks])
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    for k, (c, i) in enumerate(sorted(expected)):
        pixels = expected[(c, i)]
        top, left = (pixels.shape[0] - 16) // 2, (pixels.shape[1] - 16) // 2
        np.testing.assert_array_equal(images[k], pixels[top:top + 16, left:left + 16])
    from_tar = list(iter_imagenet(as_tar(root, tmp_path / "ILSVRC2012_img_train.tar"), 16))
    np.testing.assert_array_equal(from_tar[0][0], images)
    np.testing.assert_array_equal(from_tar[0][1], labels)
    # max_images keeps the first classes whole, in the same order.
    first = list(iter_imagenet(root, 16, max_images=3))
    assert first[0][1].tolist() == [0, 0, 1] and (first[0][0] == images[:3]).all()


def test_bad_copies_are_named(tree, tmp_path):
    root, _ = tree
    with pytest.raises(ValueError, match="datasets.imnet.path: imagenet needs 'path'"):
        check_dataset_spec("imnet", {"source": "imagenet"})
    with pytest.raises(ValueError, match="datasets.imnet.path: /no/such/train does not exist"):
        check_dataset_spec("imnet", {"source": "imagenet", "path": "/no/such/train"})
    check_dataset_spec("imnet", {"source": "imagenet", "path": str(root), "image_size": 256})
    (root / "n09999999").mkdir()
    with pytest.raises(ValueError, match="n09999999: a class folder without images"):
        list(iter_imagenet(root, 16))
    (root / "n09999999" / "n09999999_0.JPEG").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="n09999999_0.JPEG: not a readable image"):
        list(iter_imagenet(root, 16))
    with pytest.raises(ValueError, match="no class folders"):
        list(iter_imagenet(tmp_path / "train" / "n01440764", 16))
    not_tar = tmp_path / "train.tar"
    not_tar.write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="train.tar: "):
        list(iter_imagenet(not_tar, 16))


def test_the_dataset_store_keeps_the_class_labels(tree, tmp_path):
    """Through the data stage's own entry point (config entry → checks → image store): the labels
    the conditional models will read are stored beside the images."""
    from igsm.data import prepare_dataset

    root, _ = tree
    store = prepare_dataset({"source": "imagenet", "path": str(root), "image_size": 8}, tmp_path / "store",
                            tmp_path / "raw")
    assert len(store) == 6 and store.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert store[0:6].shape == (6, 8, 8, 3)
