"""Training on the hard images (``train.hard_fraction``): the scores, the pool, the loader, and runs on
real MNIST that choose the images the network gets wrong, resume exactly, and end their schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cnnlab import runs
from cnnlab.augment import Loader
from cnnlab.cli import main
from cnnlab.config import load_recipe
from cnnlab.data import load_dataset, subset
from cnnlab.errors import CnnlabError
from cnnlab.evaluate import predict
from cnnlab.hard_examples import batch_scores, hardest, pool_size, scores_of
from cnnlab.schedules import lr_at
from cnnlab.train import Interrupted, train
from conftest import assert_one_line_error

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "mnist_speedrun.toml"
# 4,000 training images (31 batches of 128, then 15 of the hardest 2,000), 500 held out
SMALL = ["train.quiet=true", "train.dtype=float32", "train.threads=1", "data.val_split=500", "data.subset=4000",
         "data.batch_size=128", "train.epochs=3", "train.target=0", "train.hard_fraction=0.5"]


def test_scores_are_quantiles_within_each_batch():
    losses = torch.tensor([0.3, 0.1, 0.9, 0.5, 2.0, 1.0, 0.2])
    batch = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    # batch 0: ranks 1, 0, 3, 2 of 4 -> (rank + 1) / 5; batch 1: 2 of 2, 1 of 2; a batch of one: the middle
    assert batch_scores(losses, batch).tolist() == pytest.approx([0.4, 0.2, 0.8, 0.6, 2 / 3, 1 / 3, 0.5])
    # batches need not be contiguous (several processes' rows), nor their ids in order
    perm = torch.tensor([6, 2, 4, 0, 5, 1, 3])
    assert torch.equal(batch_scores(losses[perm], batch[perm]), batch_scores(losses, batch)[perm])
    # one score per training image; images no batch held (a dropped last batch) score 0
    assert scores_of(5, torch.tensor([3, 1]), torch.tensor([0.9, 0.4])).tolist() == pytest.approx([0, 0.4, 0, 0.9, 0])


def test_pool_is_the_highest_scores_in_index_order_and_at_least_one_batch():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.9])
    assert hardest(scores, 0.6, 1).tolist() == [0, 1, 4]  # 3 of 5: both 0.9, then the first 0.5 (ties: lower index)
    assert hardest(scores, 1.0, 1).tolist() == [0, 1, 2, 3, 4]
    assert hardest(scores, 0.01, 1).tolist() == [1] and pool_size(5, 0.01, 1) == 1
    assert hardest(scores, 0.2, 2).tolist() == [1, 4]  # 1 image is less than a batch of 2
    assert pool_size(60000, 0.1, 256) == 6000 and pool_size(2000, 0.05, 128) == 128 and pool_size(100, 0.5, 256) == 100


@pytest.mark.parametrize("world", [1, 2])
def test_loader_epoch_over_a_pool_draws_each_pool_image_once(world):
    n, bs = 64, 8
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    pool = torch.tensor([3, 5, 8, 13, 21, 34, 40, 41, 42, 50, 55, 60, 61, 62, 63, 0, 1])  # 17: 2 full batches
    loaders = [Loader(images, torch.arange(n), bs, [0.0], [1 / 255], shuffle=True, drop_last=True,
                      rank=r, world_size=world) for r in range(world)]
    parts = [list(p.batches(torch.Generator().manual_seed(1), 1, pool)) for p in loaders]
    assert all(len(p) == loaders[0].steps(len(pool)) == 2 for p in parts)
    idx = torch.cat([torch.cat([p[i][0] for p in parts]) for i in range(2)])
    labels = torch.cat([torch.cat([p[i][2] for p in parts]) for i in range(2)])
    pixels = torch.cat([torch.cat([p[i][1] for p in parts]) for i in range(2)])
    assert len(set(idx.tolist())) == 16 and set(idx.tolist()) <= set(pool.tolist())  # 16 of 17, none twice
    assert torch.equal(labels, idx) and torch.equal(pixels[:, 0, 0, 0].round().long(), idx)  # the indices are the images
    again = torch.cat([b[0] for b in Loader(images, torch.arange(n), bs, [0.0], [1 / 255], shuffle=True,
                                             drop_last=True).batches(torch.Generator().manual_seed(2), 1, pool)])
    assert not torch.equal(again, idx)  # shuffled by the generator


def per_image_loss(ckpt: dict, ds) -> torch.Tensor:
    """Each training image's loss under the checkpoint's network (evaluation mode, no augmentation)."""
    model = runs.model_from_checkpoint(ckpt)
    d = ckpt["dataset"]
    logits, labels = predict(model, Loader(ds.train.images, ds.train.labels, 500, d["mean"], d["std"]), False)
    return F.cross_entropy(logits, labels, reduction="none")


def test_later_epochs_train_on_the_images_the_network_gets_wrong_and_resume_exactly(tmp_path, monkeypatch,
                                                                                      interrupt_at_epoch):
    cfg = load_recipe(RECIPE, SMALL)
    seen = []  # (epoch, indices) of every batch the loader gives the training loop
    batches = Loader.batches

    def spy(self, gen=None, epoch=1, pool=None):
        for idx, x, y in batches(self, gen, epoch, pool):
            if self.shuffle:
                seen.append((epoch, idx.clone()))
            yield idx, x, y

    monkeypatch.setattr(Loader, "batches", spy)
    full = train(cfg, tmp_path / "full")
    assert [r["images"] for r in full.history] == [31 * 128, 15 * 128, 15 * 128]
    assert full.result["images_trained"] == 61 * 128 and full.result["images_per_epoch"] == 31 * 128
    # the schedule spans the run's 61 steps: the last is one step from a 3-epoch OneCycle's end (over
    # 93 steps of full epochs, step 60 would be at 65% of it, the LR still at 0.4 of its peak)
    o, s = cfg.optim, cfg.schedule
    assert full.history[-1]["lr"] == pytest.approx(lr_at(s, o, 60, 61 / 3, 3)[0])
    assert full.history[-1]["lr"] < o.lr / 20
    assert full.history[-1]["val_acc"] > 0.9

    disarm = interrupt_at_epoch(2)
    out = tmp_path / "cut"
    with pytest.raises(Interrupted):
        train(cfg, out)
    disarm()
    ckpt = runs.load_checkpoint(out)
    assert ckpt["epoch"] == 1 and ckpt["hard_scores"].shape == (4000,)
    ds = subset(load_dataset("mnist", val_split=500, acquire=False, log=lambda *a: None), 4000)
    del seen[:]
    resumed = train(None, out, resume=True)
    strip = [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in full.history]
    assert [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in resumed.history] == strip
    assert torch.equal(runs.load_checkpoint(out)["hard_scores"], runs.load_checkpoint(tmp_path / "full")["hard_scores"])

    # epochs 2 and 3 trained the hardest half by the scores epoch 1 left, each image once per epoch
    pool = hardest(ckpt["hard_scores"], 0.5, 128)
    for epoch in (2, 3):
        trained = torch.cat([i for e, i in seen if e == epoch])
        assert len(trained) == 15 * 128 and len(set(trained.tolist())) == len(trained)
        assert set(trained.tolist()) <= set(pool.tolist())
    # and those are the images the network of epoch 1 finds hard: under it, the pool's mean loss is
    # 3x the rest's (measured), and it holds 80% of the images with a loss above 1; a random half
    # would hold half of them (+-3 points)
    loss = per_image_loss(ckpt, ds)
    rest = torch.ones(4000, dtype=torch.bool)
    rest[pool] = False
    assert loss[pool].mean() > 2 * loss[rest].mean(), (loss[pool].mean(), loss[rest].mean())
    high = loss > 1.0
    assert high[pool].sum() > 0.7 * high.sum() and high.sum() > 100, (high[pool].sum(), high.sum())


def test_a_pool_smaller_than_a_batch_is_one_batch(tmp_path):
    cfg = load_recipe(RECIPE, SMALL + ["train.hard_fraction=0.01", "train.epochs=2"])  # 40 images < a batch of 128
    assert [r["images"] for r in train(cfg, tmp_path / "run").history] == [31 * 128, 128]


@pytest.mark.parametrize("value", [0, -0.5, 1.5])
def test_hard_fraction_outside_0_1_is_refused(value):
    with pytest.raises(CnnlabError, match=r"train.hard_fraction = .*: must be in \(0, 1\]"):
        load_recipe(RECIPE, [f"train.hard_fraction={value}"])


@pytest.mark.parametrize("schedule", [["schedule.name=\"step\""], ["schedule.name=\"piecewise\"",
                                      "schedule.knots=[0, 3]", "schedule.values=[1, 0]"], ["schedule.warmup_epochs=1"]])
def test_hard_fraction_with_a_schedule_that_counts_epochs_is_refused(schedule, capsys):
    rc = main(["train", str(RECIPE), "--set", "train.hard_fraction=0.5", *(a for s in schedule for a in ("--set", s))])
    _, err = capsys.readouterr()
    assert_one_line_error(rc, err, "train.hard_fraction = 0.5 makes the later epochs shorter than the first",
                          "counts epochs: use schedule.name = \"onecycle\" or \"constant\" without warmup_epochs")


@pytest.mark.parametrize("damage", ["missing", "short", "nan"])
def test_resume_with_damaged_scores_is_one_line_and_changes_nothing(tmp_path, capsys, interrupt_at_epoch, damage):
    out = tmp_path / "run"
    disarm = interrupt_at_epoch(2)
    with pytest.raises(Interrupted):
        train(load_recipe(RECIPE, SMALL), out)
    disarm()
    ckpt = runs.load_checkpoint(out)
    ckpt["hard_scores"] = {"missing": None, "short": ckpt["hard_scores"][:-1],
                           "nan": ckpt["hard_scores"].clone().fill_(float("nan"))}[damage]
    runs.save_checkpoint(out / "last.pt", ckpt)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc = main(["train", "--resume", str(out)])
    _, err = capsys.readouterr()
    assert_one_line_error(rc, err, "last.pt: its hard-image scores (train.hard_fraction) are missing or not one "
                                   "number per training image (4000); start the run again with --overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
