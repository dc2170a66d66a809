"""Every CIFAR recipe runs end to end on the real (JPEG-reconstructed) CIFAR-10 training set.

The shared copy stands beside the repository in CI (``../shared``); ``make test`` acquires it into
the data cache with ``cnnlab data get cifar10 --from``. Runs are cut to a few steps on 256
images (the ResNets at a quarter of their width) so the whole file takes seconds, yet they go
through the recipe's own model, optimizer, schedule, augmentation, checkpoint and resume.
"""

from pathlib import Path

import pytest
import torch

from cnnlab import runs
from cnnlab import train as train_mod
from cnnlab.config import load_recipe
from cnnlab.data import load_dataset
from cnnlab.summary import count_params
from cnnlab.train import train

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CIFAR = ["cifar_sep92k", "cifar_dw56k", "cifar_dw56k_fast", "resnet9", "resnet9_onecycle", "resnet_custom", "airbench94", "airbench94_muon",
         "airbench_muon_cpu"]
SMALL = ["train.quiet=true", "train.threads=1", "data.subset=256", "data.val_split=256", "data.eval_batch_size=256",
         "data.batch_size=64", "train.epochs=2", "train.target=0"]
# per recipe: the ResNets at a quarter width; airbench_muon_cpu's chunks scaled to the smaller batch (64 = 24 + 24 + 16)
NARROW = {"resnet9": ["model.width=0.25"], "resnet9_onecycle": ["model.width=0.25"], "resnet_custom": ["model.width=0.25"],
          "airbench_muon_cpu": ["train.micro_batch=24"]}


@pytest.fixture(scope="module")
def cifar():
    """The real CIFAR-10 copy must be in the data cache (make test puts it there); fail, don't skip."""
    ds = load_dataset("cifar10", val_split=5000, acquire=False, log=lambda *a: None)
    assert len(ds.train) == 45000 and len(ds.test) == 5000 and ds.train.labels[0] == 6
    return ds


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_recipe_runs_checkpoints_and_resumes(name, tmp_path, interrupt_at_epoch, cifar):
    cfg = load_recipe(RECIPES / f"{name}.toml", SMALL + NARROW.get(name, []))
    out = tmp_path / name
    disarm = interrupt_at_epoch(2)
    with pytest.raises(train_mod.Interrupted):
        train(cfg, out)
    disarm()
    assert len(runs.read_metrics(out)) == 1
    res = train(None, out, resume=True)
    assert res.result["epochs_run"] == 2 and res.result["model"] == cfg.model.name
    assert res.result["dataset"] == "cifar10" and res.result["eval_split"] == "val"
    for row in res.history:
        assert torch.isfinite(torch.tensor([row["train_loss"], row["val_loss"]])).all()
        assert 0 <= row["val_acc"] <= 1
    model = runs.model_from_checkpoint(runs.load_checkpoint(out, "best"))
    assert count_params(model)[0] == res.result["params"]  # Keras total: weights + BN statistics


@pytest.mark.parametrize("name", ["resnet9", "resnet_custom"])
def test_full_width_resnet_recipe_reduces_the_loss_over_256_steps(name, tmp_path, cifar):
    """The seed recipes at full width (6.58M params for ResNet9) learn: 256 optimizer steps of batch 8
    on 512 real CIFAR images, with the recipe's own optimizer, schedule and augmentation."""
    cfg = load_recipe(RECIPES / f"{name}.toml", SMALL + ["train.threads=2", "data.subset=512", "data.batch_size=8",
                                                         "train.epochs=4"])
    res = train(cfg, tmp_path / name)
    assert res.result["params"] > 6_000_000
    losses = [r["train_loss"] for r in res.history]
    assert len(losses) == 4  # 4 epochs x 512 / 8 = 256 steps
    assert losses[-1] < 0.8 * losses[0], losses
    assert runs.load_checkpoint(tmp_path / name, "last")["epoch"] == 4


def test_airbench_whitening_bias_stops_training_after_its_epochs_across_a_resume(tmp_path, interrupt_at_epoch, cifar):
    """whiten_bias_epochs=1: the bias moves in epoch 1 (from zero) and not after, also when the run
    resumes at epoch 2; the other weights keep training. Lookahead off, so only the optimizer moves weights."""
    cfg = load_recipe(RECIPES / "airbench94.toml", SMALL + ["train.epochs=3", "model.whiten_bias_epochs=1",
                                                            "train.lookahead=0"])
    out = tmp_path / "air"
    disarm = interrupt_at_epoch(2)
    with pytest.raises(train_mod.Interrupted):
        train(cfg, out)
    disarm()
    first = runs.load_checkpoint(out, "last")
    assert first["epoch"] == 1
    train(None, out, resume=True)
    final = runs.load_checkpoint(out, "last")
    assert final["epoch"] == 3
    bias = "features.0.bias"
    assert first["state_dict"][bias].abs().sum() > 0  # it trained in epoch 1
    assert torch.equal(final["state_dict"][bias], first["state_dict"][bias])
    assert not torch.equal(final["state_dict"]["head.1.weight"], first["state_dict"]["head.1.weight"])
