"""Worker seeds of the training loader: per rank and epoch, the same again on resume, global RNG untouched."""
import torch
from torch.utils.data import Dataset, get_worker_info

from dat_ds.data import start_epoch, train_loader


class WorkerDraws(Dataset):
    """Sample i: (the seed of the worker that reads it, one draw of that worker's torch RNG)."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.tensor([get_worker_info().seed, int(torch.randint(0, 2 ** 62, ()))]), i


def epoch(loader, e: int) -> torch.Tensor:
    start_epoch(loader, e)
    return torch.cat([x for x, _ in loader])


def loader(rank: int, world: int = 2):
    return train_loader(WorkerDraws(), 2, rank, world, seed=7, num_workers=2)


def test_ranks_draw_their_own_worker_seeds_and_a_resumed_epoch_the_same():
    before = torch.get_rng_state()
    seeds = [set(epoch(loader(rank), 3)[:, 0].tolist()) for rank in (0, 1)]
    assert len(seeds[0]) == len(seeds[1]) == 2               # two workers per rank
    assert seeds[0].isdisjoint(seeds[1]), "worker k of every rank would draw the same augmentations"
    again = loader(0)
    assert set(epoch(again, 3)[:, 0].tolist()) == seeds[0]    # same rank, same epoch: same seeds
    assert set(epoch(again, 4)[:, 0].tolist()).isdisjoint(seeds[0])
    assert torch.equal(torch.get_rng_state(), before)


def test_a_resumed_epoch_draws_what_the_uninterrupted_run_drew():
    """Workers are seeded for every epoch: epoch 1 after epoch 0 draws what a run resumed at epoch 1 draws."""
    through = loader(1)
    epoch(through, 0)
    assert torch.equal(epoch(through, 1), epoch(loader(1), 1))
