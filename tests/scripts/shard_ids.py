"""A dataset plugin that records which training samples each rank reads from shards (``--plugin``):
``--dataset shards_ids --data-dir DIR`` is ``shards`` whose loader appends each minibatch's source
positions (the records' ``index``) to ``$DAT_DS_ID_LOG.rank<r>``, one line per minibatch."""
import os

from dat_ds.data import DATASETS, Loaded
from dat_ds.data.shards import ShardLoader, ShardStream, shards


class RecordedLoader(ShardLoader):
    def unpack(self, batch):
        with open(f"{os.environ['DAT_DS_ID_LOG']}.rank{os.environ.get('RANK', '0')}", "a") as f:
            f.write(" ".join(str(int(i)) for i in batch["index"]) + "\n")
        return super().unpack(batch)


class RecordedStream(ShardStream):
    loader_class = RecordedLoader


@DATASETS.register("shards_ids")
def shards_ids(name, data_dir=None, img_size=None):
    train, test, stats = shards("shards", data_dir, img_size)
    return Loaded(RecordedStream(train.root, train.length, train.transform, train.mode), test, stats)


shards_ids.internal_settings = ("name", "data_dir", "img_size")
