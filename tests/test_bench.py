"""The bench command's accounting: what is timed, what is not, and the JSON it writes.

No test asserts a wall-clock time; they check that the numbers are consistent with each other.
"""

import json
from pathlib import Path

import pytest
import torch

from cnnlab import bench, cli, train
from cnnlab.config import load_recipe
from cnnlab.summary import summarize

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "mnist_tiny.toml"
TINY = ["train.quiet=true", "train.dtype=float32", "train.threads=1", "data.subset=512", "data.val_split=250",
        "data.eval_batch_size=250", "data.batch_size=128", "train.epochs=2"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_bench_excludes_evaluation_time(tmp_path, monkeypatch):
    """Evaluation is made to take 1000 s on the training clock: none of it may be counted."""
    clock = {"skew": 0.0}
    real_clock, real_predict = train.time.perf_counter, train.predict

    def skewed_clock():
        return real_clock() + clock["skew"]

    def slow_predict(*a, **k):
        clock["skew"] += 1000.0
        return real_predict(*a, **k)

    monkeypatch.setattr(train.time, "perf_counter", skewed_clock)
    monkeypatch.setattr(train, "predict", slow_predict)
    cfg = load_recipe(RECIPE, TINY + ["train.target=0.05"])  # reached at epoch 1
    res = bench.bench_recipe(cfg, [0, 1], tmp_path, log=lambda *a: None)
    assert [r["seed"] for r in res["runs"]] == [0, 1]
    for r in res["runs"]:
        metrics = [json.loads(line) for line in (tmp_path / f"seed{r['seed']}" / "metrics.jsonl").read_text().splitlines()]
        epoch_sum = sum(m["epoch_seconds"] for m in metrics)
        assert r["train_seconds"] == pytest.approx(epoch_sum, rel=1e-9)
        assert r["reached"] and r["target_epoch"] == 1
        # the time to target is the cumulative training time at the first epoch that reached it
        assert r["time_to_target_s"] == pytest.approx(metrics[0]["train_seconds"], rel=1e-9)
        # each evaluation moved the clock 1000 s; none of that is counted
        assert r["train_seconds"] < 1000 and r["time_to_target_s"] < 1000
        assert r["seconds_per_epoch"] == pytest.approx(r["train_seconds"] / r["epochs_run"])
        # subset=512 training images, 4 full batches of 128 per epoch
        assert r["train_images_per_s"] == pytest.approx(512 * r["epochs_run"] / r["train_seconds"])
    assert res["reached"] == "2/2"
    times = [r["time_to_target_s"] for r in res["runs"]]
    assert res["time_to_target_s"]["min"] == min(times) and res["time_to_target_s"]["max"] == max(times)
    assert res["final_acc"]["mean"] == pytest.approx(sum(r["final_acc"] for r in res["runs"]) / 2)
    assert res["peak_rss_mb"] > 50
    # achieved compute = 6 FLOPs per MAC per trained image (13,840-param mnist_tiny: ~2.4M MACs/image)
    assert res["macs_per_image"] == summarize("mnist_tiny").macs > 1_000_000
    for r in res["runs"]:
        assert r["train_gflops"] == pytest.approx(6 * res["macs_per_image"] * r["train_images_per_s"] / 1e9)
    assert res["peak_gflops"] > res["train_gflops"]["max"] > 0
    assert res["environment"]["torch_version"] == torch.__version__
    assert res["environment"]["threads"] == 1  # the recipe's train.threads, not the caller's
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if "model name" in cpuinfo:  # the host is named: numbers from different CPUs must not be mixed
        assert f": {res['environment']['cpu']}\n" in cpuinfo and res["environment"]["cpu"] != "x86_64"


def test_time_to_target_counts_a_miss_as_infinitely_slow():
    """A seed that never reached the target is slower than any that did: the median needs half
    the seeds to reach it, the mean and max all of them."""
    assert bench.time_to_target_stats([10.0, 30.0, 20.0]) == {"mean": 20.0, "median": 20.0, "min": 10.0, "max": 30.0}
    assert bench.time_to_target_stats([10.0, None, 30.0]) == {"mean": None, "median": 30.0, "min": 10.0, "max": None}
    assert bench.time_to_target_stats([10.0, None, None])["median"] is None
    assert bench.time_to_target_stats([10.0, None])["median"] is None  # halfway between 10 and a miss
    assert bench.time_to_target_stats([None]) == {"mean": None, "median": None, "min": None, "max": None}


def test_bench_target_not_reached_is_null(tmp_path):
    cfg = load_recipe(RECIPE, TINY + ["train.target=0.9999"])
    res = bench.bench_recipe(cfg, [0], tmp_path, log=lambda *a: None)
    run = res["runs"][0]
    assert run["reached"] is False and run["time_to_target_s"] is None
    assert res["reached"] == "0/1" and res["time_to_target_s"]["median"] is None
    assert run["epochs_run"] == 2
    assert "| 0 |" in bench.markdown(res)
    # wall time (training + evaluation + saving) is reported beside training time, and never below it
    assert run["wall_seconds"] >= run["train_seconds"] > 0
    assert res["wall_over_train"]["median"] >= 1 and "wall s" in bench.markdown(res)


def test_bench_cli_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "b"
    code = cli.main(["bench", str(RECIPE), "--seeds", "1", "--target", "0.05", "--out", str(out),
                     *[a for s in TINY for a in ("--set", s)]])
    assert code == 0
    data = json.loads((out / "bench.json").read_text())
    for key in ("recipe", "target", "runs", "reached", "time_to_target_s", "final_acc", "seconds_per_epoch",
                "train_images_per_s", "macs_per_image", "train_gflops", "peak_gflops", "peak_rss_mb", "environment"):
        assert key in data, key
    assert data["target"] == 0.05 and data["runs"][0]["reached"] and data["recipe"] == str(RECIPE)
    md = (out / "bench.md").read_text()
    assert "cnnlab bench" in md and "| **median** |" in md and "GFLOP/s" in md
    assert "--set train.epochs=2" in md and "--target 0.05" in md  # the exact command


def test_bench_cli_bad_input(tmp_path, capsys):
    assert cli.main(["bench", "--out", str(tmp_path)]) == 2
    assert "pass a recipe" in capsys.readouterr().err
    assert cli.main(["bench", str(RECIPE), "--target", "1.5", "--out", str(tmp_path)]) == 2
    assert "train.target" in capsys.readouterr().err
    assert cli.main(["bench", str(RECIPE), "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "at least 1 seed" in capsys.readouterr().err
    for argv, needle in [(["--throughput", "mnist_8k", "--batch-size", "-5"], "--batch-size -5"),
                         (["--throughput", "mnist_8k", "--batch-size", "0"], "batch size >= 1"),
                         ([str(RECIPE), "--batch-size", "64"], "only with --throughput"),
                         ([str(RECIPE), "--throughput", "--set", "train.epochs=2"], "drop --set"),
                         (["--throughput", "mnist_8k", "--target", "0.9"], "drop --set and --target"),
                         (["--throughput", "nosuchmodel"], "nosuchmodel"),
                         (["--throughput", "missing.toml"], "missing.toml")]:
        assert cli.main(["bench", *argv, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_throughput_rows():
    rows = bench.throughput(["mnist_8k"], batch_size=8, steps=2, settings=(("float32", False), ("bfloat16", True)),
                            log=lambda *a: None)
    assert [(r["dtype"], r["channels_last"]) for r in rows] == [("float32", False), ("bfloat16", True)]
    for r in rows:
        assert r["images_per_s"] == pytest.approx(8 / (r["ms_per_step"] / 1000))
        assert r["gflops"] == pytest.approx(6 * summarize("mnist_8k").macs * r["images_per_s"] / 1e9)
        assert r["pct_of_peak"] == pytest.approx(100 * r["gflops"] / r["peak_gflops"]) and r["peak_gflops"] > 1
    assert "| mnist_8k | 8 | bfloat16 | channels_last |" in bench.throughput_markdown(rows)


def test_throughput_of_a_recipe_uses_its_batch_size_and_model_options():
    cfg = load_recipe(ROOT / "recipes" / "mnist_fast.toml")
    cfg.model.options = {"crop": 20}
    rows = bench.throughput([cfg, "mnist_8k"], steps=1, settings=(("float32", True),), log=lambda *a: None)
    assert [(r["model"], r["batch_size"]) for r in rows] == [("mnist_fast", 256), ("mnist_8k", 128)]
    assert rows[0]["macs_per_image"] == summarize("mnist_fast", crop=20).macs != summarize("mnist_fast").macs


def test_throughput_of_a_recipe_steps_in_its_micro_batches(monkeypatch):
    cfg = load_recipe(ROOT / "recipes" / "mnist_8k.toml", ["train.micro_batch=48", "data.batch_size=128"])
    chunks, split = [], train.micro_batches

    def recording(x, y, size):
        parts = split(x, y, size)
        chunks.append([len(yk) for _, yk in parts])
        return parts

    monkeypatch.setattr(train, "micro_batches", recording)  # what train_epoch's chunked step splits with
    rows = bench.throughput([cfg], steps=1, settings=(("float32", True),), log=lambda *a: None)
    assert chunks == [[48, 48, 32]] * 2  # a warm-up step and a timed one
    assert rows[0]["micro_batch"] == 48 and rows[0]["batch_size"] == 128
    assert "| mnist_8k | 128 in 48s | float32 |" in bench.throughput_markdown(rows)
