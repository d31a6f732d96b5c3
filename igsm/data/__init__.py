"""Training images: download, check, parse, and store as one uint8 array (N×H×W×C).

Each source is one module that registers itself (``igsm.data.sources``):

* ``cifar10`` (``cifar10.py``): the official python-pickle archive, sha256-checked.
* ``fashion-mnist`` (``fashion_mnist.py``): the official idx archives, padded to ``image_size``.
* ``celeba`` (``celeba.py``): CelebA's aligned images, cropped and resized as DDIM and U-ViT do.
* ``lsun`` (``lsun.py``): LSUN scene LMDBs (church_outdoor, bedroom, …), short side resized, centre-cropped.
* ``sklearn-digits`` (``sklearn_digits.py``): 8×8 digits shipped with scikit-learn (the demo).
* ``image-folder`` (``image_folder.py``): a user's own images.
* ``imagenet`` (``imagenet.py``): the user's ILSVRC2012 train copy, class labels, ADM's centre crop.
* ``mscoco`` (``mscoco.py``): COCO 2014/2017 images with one caption each (labels = store positions).

An empty ``url`` and an absent digest mean the source's official ones (constants in its module).
``check_dataset_spec`` reports the errors a config entry alone shows, before any job runs.

A source yields its images in chunks (uint8 n×H×W×C with int64 labels, and a list of n captions
for mscoco); the data stage streams them into an on-disk image store (``store.py``: memory-mapped
shards, digests recorded once), which training, pruning and the FID reference statistics read in
batches.
"""

from igsm.data.common import (REMAKE, URL_SCHEMES, DownloadError, download, fetch_cached, file_digest,
                              numpy_error_text, read_npz, save_arrays, to_model_range, to_uint8,
                              write_text_atomically)
from igsm.data.store import ImageStore, StoreWriter, load_images, write_store
from igsm.data.sources import SOURCES, DataSource, check_dataset_spec, prepare_dataset, register

# The sources, each registering itself on import (order = the order errors list them in).
from igsm.data.cifar10 import CIFAR10_SHA256, CIFAR10_URL, parse_cifar10  # noqa: E402
from igsm.data.fashion_mnist import (DEBIAN_FASHION_MNIST_SHA256, FASHION_MNIST_FILES,  # noqa: E402
                                     FASHION_MNIST_SHA256, FASHION_MNIST_URL, IDX_IMAGES, IDX_LABELS,
                                     load_fashion_mnist, read_idx)
from igsm.data.celeba import CELEBA_MD5, load_celeba  # noqa: E402
from igsm.data.lsun import LSUN_CATEGORIES, LSUN_URL, center_crop_arr, read_lmdb  # noqa: E402
from igsm.data.sklearn_digits import load_sklearn_digits  # noqa: E402
from igsm.data.image_folder import IMAGE_SUFFIXES, load_image_folder  # noqa: E402
from igsm.data.imagenet import iter_imagenet  # noqa: E402
from igsm.data.mscoco import COCO_SHA256, iter_mscoco  # noqa: E402
