"""A dataset plugin that records which training samples each rank reads (``--plugin``): the first
``DAT_DS_IDS_TRAIN`` Fashion-MNIST training images, each minibatch's indices appended to
``$DAT_DS_ID_LOG.rank<r>``, one line per minibatch."""
import os

from dat_ds.data import DATASETS, Loaded, TensorImages
from dat_ds.data.idx import FASHION_MNIST, load_mnist_family


class RecordedImages(TensorImages):
    def __getitems__(self, idx):
        with open(f"{os.environ['DAT_DS_ID_LOG']}.rank{os.environ.get('RANK', '0')}", "a") as f:
            f.write(" ".join(str(int(i)) for i in idx) + "\n")
        return super().__getitems__(idx)

    def raw_view(self):
        return RecordedImages(self.images, self.labels, self.augment, raw=True)


@DATASETS.register("fmnist_ids")
def fmnist_ids(name, data_dir=None, img_size=None):
    train, test = load_mnist_family("fashion_mnist", data_dir)
    n = int(os.environ.get("DAT_DS_IDS_TRAIN", "640"))
    return Loaded(RecordedImages(train.images[:n], train.labels[:n]), test.subset(64), FASHION_MNIST)


fmnist_ids.internal_settings = ("name", "data_dir", "img_size")
