"""``cnnlab search`` (issue 15): a real search on an MNIST subset, pruning, the budget, the best
recipe, the report, bad input, and workers sharing one study on SQLite and on a real PostgreSQL
server (``scripts/with-postgres.sh`` starts one for ``make test`` and exports its URL)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import optuna
import pytest

from cnnlab import search
from cnnlab.cli import main
from cnnlab.models import create_model
from cnnlab.summary import summarize
from test_evaluate import assert_png
from test_report import PROBE, run_chromium

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
BASE = f'recipe = "{REPO / "recipes" / "mnist_8k.toml"}"\n'
TINY = """
[data]
val_split = 1000
subset = 2000

[train]
dtype = "float32"
threads = 1
target = 0.0
"""
SEARCH = """
epochs = 3
max_params = 6000
pruner = {name = "median", startup_trials = 2}
seed = 0
trials = 6
"""
SPACE = """
"model.width" = {float = [0.5, 1.2]}
"optim.lr" = {float = [0.001, 0.5], log = true}
"""


def write_search(path: Path, search_table: str = SEARCH, space: str = SPACE, recipe: str = BASE + TINY) -> Path:
    path.write_text(f"{recipe}\n[search]\n{search_table}\n[space]\n{space}")
    return path


def records(out: Path) -> list[dict]:
    return json.loads((out / "trials.json").read_text())["trials"]


def trained_count(out: Path) -> int:
    return sum(r["state"] in ("complete", "pruned") for r in records(out))


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> tuple[Path, Path, str]:
    """One real search on 2,000 MNIST images (1,000 held out for validation), 3 epochs per trial,
    then --final; returns the search file, its directory and what the command printed."""
    root = tmp_path_factory.mktemp("search")
    path = write_search(root / "tiny.toml")
    out = root / "out"
    lines = []
    search.run_search(path, out=out, final=True, log=lines.append)
    return path, out, "\n".join(lines)


def test_search_trains_prunes_and_rejects_over_budget_designs(searched):
    path, out, printed = searched
    recs = records(out)
    states = [r["state"] for r in recs]
    assert trained_count(out) == 6, states
    assert "pruned" in states and "rejected" in states and "complete" in states, states
    assert [r["number"] for r in recs] == list(range(len(recs)))
    for r in recs:
        assert f"trial {r['number']:>4}" in printed  # a progress line per trial
        width = r["params"]["model.width"]
        assert r["attrs"]["params"] == summarize(create_model("mnist_8k", dropout=0.03, width=width),
                                                 input_shape=(1, 28, 28)).total_params
        run = out / f"trial_{r['number']:04d}"
        if r["state"] == "rejected":  # over budget: measured, never trained, no run directory
            assert r["attrs"]["params"] > 6000 and "epochs" not in r["attrs"] and not run.exists()
            continue
        assert r["attrs"]["params"] <= 6000
        result = json.loads((run / "result.json").read_text())
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert result["eval_split"] == "val" and len(rows) == result["epochs_run"]
        assert [row["val_acc"] for row in rows] == [r["intermediate"][str(row["epoch"])] for row in rows]
        if r["state"] == "pruned":  # stopped at once: fewer epochs than the trials that finished
            assert result["status"] == "pruned" and result["epochs_run"] < 3
        else:
            assert result["status"] == "done" and result["epochs_run"] == 3
            assert r["values"] == [result["final_val_acc"]]
    assert "pruned at epoch" in printed and "rejected before training" in printed


def test_trials_are_ordinary_runs_and_best_recipe_reproduces(searched, tmp_path, cli):
    _, out, _ = searched
    data = json.loads((out / "trials.json").read_text())
    best = next(r for r in data["trials"] if r["number"] == data["best"])
    assert best["val_acc"] == max(r["val_acc"] for r in data["trials"] if r["state"] == "complete")
    rc, table, err = cli("runs", out, "--sort", "best_acc")
    assert rc == 0, err
    assert table.splitlines()[2].split()[0] == best["attrs"]["run"]
    rc, _, err = cli("train", out / "best_recipe.toml", "--out", tmp_path / "again", "--quiet")
    assert rc == 0, err
    again = json.loads((tmp_path / "again" / "result.json").read_text())
    assert again["final_val_acc"] == best["val_acc"]  # same recipe, same seed, same CPU: the same number
    assert again["params"] == best["attrs"]["params"]


def test_final_evaluates_the_best_design_once_on_the_test_set(searched):
    _, out, printed = searched
    data = json.loads((out / "trials.json").read_text())
    best = next(r for r in data["trials"] if r["number"] == data["best"])
    ev = json.loads((out / "final" / "eval.json").read_text())
    assert ev["split"] == "test" and ev["n"] == 10_000 and ev["checkpoint"] == "last"
    assert Path(ev["run"]).name == best["attrs"]["run"]
    assert f"{ev['accuracy']:.2%}" in printed and "test set" in printed


def test_rerun_continues_the_study_without_reusing_numbers(searched, tmp_path):
    path, out, _ = searched
    copy = tmp_path / "out"
    subprocess.run(["cp", "-a", str(out), str(copy)], check=True)
    lines = []
    search.run_search(path, out=copy, log=lines.append)  # same command: the study is complete
    assert "6 of 6 trials done" in lines[0] and trained_count(copy) == 6
    before = {r["number"] for r in records(copy)}
    search.run_search(path, out=copy, trials=7, log=lines.append)  # one more
    after = records(copy)
    assert trained_count(copy) == 7
    assert [r["number"] for r in after] == list(range(len(after))) and before < {r["number"] for r in after}


def test_search_report_renders_in_headless_chromium(searched, tmp_path, cli):
    _, out, _ = searched
    rc, printed, err = cli("report", out)
    assert rc == 0, err
    page = out / "report.html"
    assert printed.strip() == str(page)
    text = page.read_text()
    assert "<script" not in text.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", text, re.I)
    srcs = re.findall(r'<img src="([^"]*)"', text)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for name in search_report_pictures():
        assert_png(out / name)
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", PROBE + "</body>"))
    proc = run_chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    widths = json.loads(re.search(r"<title>(.*?)</title>", proc.stdout, re.S).group(1))
    assert len(widths) == 3 and all(w > 0 for w in widths), widths
    dom = proc.stdout
    data = json.loads((out / "trials.json").read_text())
    best = next(r for r in data["trials"] if r["number"] == data["best"])
    ev = json.loads((out / "final" / "eval.json").read_text())
    assert f"{100 * best['val_acc']:.2f}%" in dom and f"{100 * ev['accuracy']:.2f}%" in dom
    assert "<b>validation</b> accuracy" in dom and "<b>test</b> accuracy" in dom  # which split each number is
    assert "budget" in dom and "[model]" in dom  # the budget, and the best recipe itself
    assert dom.count("<tr>") >= len(data["trials"]) + 1


def search_report_pictures() -> tuple[str, ...]:
    from cnnlab.search_report import PICTURES

    return PICTURES


def test_two_objectives_pareto_and_diverged_designs(tmp_path):
    """val_acc + params (a Pareto study, no pruner); a learning rate that blows up marks its trial
    diverged (the sampler learns from it) and the search goes on."""
    path = write_search(tmp_path / "mo.toml", 'objective = ["val_acc", "params"]\nsampler = "random"\nseed = 0\n'
                        'epochs = 1\ntrials = 6\ntarget = 0.2', '"optim.lr" = {choice = [0.1, 3000.0]}\n'
                        '"model.width" = {choice = [0.5, 0.75]}')
    out = tmp_path / "out"
    lines = []
    data = search.run_search(path, out=out, log=lines.append)
    recs = data["trials"]
    assert {r["state"] for r in recs} == {"complete", "diverged"}, [r["state"] for r in recs]
    for r in recs:
        result = json.loads((out / r["attrs"]["run"] / "result.json").read_text())
        if r["state"] == "diverged":
            assert r["params"]["optim.lr"] == 3000.0 and result["status"] == "diverged"
        else:
            assert r["values"] == [result["final_val_acc"], r["attrs"]["params"]]  # the two objectives
    done = [r for r in recs if r["state"] == "complete"]
    reached = [r for r in done if r["val_acc"] >= 0.2]
    best = min(reached, key=lambda r: r["attrs"]["params"]) if reached else max(done, key=lambda r: r["val_acc"])
    assert data["best"] == best["number"]
    assert any("diverged: loss became" in line or "diverged: evaluation loss" in line for line in lines)


def test_best_record_and_pareto_front():
    from cnnlab.search_report import pareto_front

    def rec(n, acc, params, state="complete"):
        return {"number": n, "state": state, "val_acc": acc, "attrs": {"params": params}}

    recs = [rec(0, 0.990, 7000), rec(1, 0.995, 7900), rec(2, 0.994, 5000), rec(3, 0.980, 3000),
            rec(4, 0.999, 100, "pruned"), rec(5, 0.970, 4000)]
    assert search.best_record(recs, None)["number"] == 1  # the most accurate finished trial
    assert search.best_record(recs, 0.994)["number"] == 2  # the fewest params reaching the target
    assert search.best_record(recs, 0.9999)["number"] == 1  # none reaches it: the most accurate
    assert [r["number"] for r in pareto_front(recs)] == [3, 2, 1]


# ----------------------------------------------------------------------------- the search file


def test_placeholders_fill_any_recipe_string():
    recipe = {"model": {"layers": ["conv {c1} k3", "{extra}", "conv {c2} k{k}"], "width": "{w}"}, "data": {"x": 1}}
    assert search.placeholders(recipe) == {"c1", "extra", "c2", "k", "w"}
    filled = search.fill(recipe, {"c1": 8, "extra": "", "c2": 16, "k": 3, "w": 0.75})
    # a whole-string placeholder keeps its type; an item filled with "" is dropped (a block searched away)
    assert filled == {"model": {"layers": ["conv 8 k3", "conv 16 k3"], "width": 0.75}, "data": {"x": 1}}


def test_a_zoo_option_searched_through_a_placeholder(tmp_path):
    path = write_search(tmp_path / "p.toml", "max_params = 6000", "w = {choice = [0.5, 0.75]}",
                        BASE + TINY + '[model]\nwidth = "{w}"\n')
    spec = search.load_search(path)
    cfg = search.trial_config(spec, {"w": 0.75})
    assert cfg.model.options["width"] == 0.75 and cfg.model.name == "mnist_8k"
    assert search.measure(cfg, ((1, 28, 28), 10, "mnist"))[0] == summarize("mnist_8k", dropout=0.03,
                                                                          width=0.75).total_params


def test_a_layer_design_searched_through_placeholders(tmp_path):
    """The layer notation, searched: widths and a pool size fill strings of [model] layers, a block
    searched away drops out, and a design whose maps shrink to nothing is rejected before training."""
    recipe = (f'recipe = "{REPO / "recipes" / "designs" / "mnist_8k.toml"}"\n{TINY}\n[model]\nlayers = ['
              '"conv {c1}", "conv 8", "maxpool {pool}", "trans 8", "conv 8", "{extra}", "gap", '
              '"conv classes k1 plain", "flatten"]\n')
    path = write_search(tmp_path / "layers.toml", 'epochs = 1\ntrials = 3\nsampler = "random"\nseed = 3\n'
                        'pruner = "none"', 'c1 = {int = [4, 8]}\npool = {choice = [2, 20, 3]}\n'
                        'extra = {choice = ["", "conv 8 p1"]}', recipe)
    out = tmp_path / "out"
    data = search.run_search(path, out=out, log=lambda *a: None)
    recs = data["trials"]
    invalid = [r for r in recs if r["state"] == "rejected"]
    assert invalid and all(r["params"]["pool"] == 20 and "not a valid design" in r["attrs"]["rejected"]
                           and not (out / f"trial_{r['number']:04d}").exists() for r in invalid)
    done = [r for r in recs if r["state"] == "complete"]
    assert len(done) == 3
    for r in done:
        trained = tomllib.loads((out / r["attrs"]["run"] / "config.toml").read_text())
        p = r["params"]
        layers = [f"conv {p['c1']}", "conv 8", f"maxpool {p['pool']}", "trans 8", "conv 8",
                  *([p["extra"]] if p["extra"] else []), "gap", "conv classes k1 plain", "flatten"]
        assert trained["model"]["layers"] == layers
        facts = ((1, 28, 28), 10, "mnist")
        assert r["attrs"]["params"] == search.measure(search.trial_config(search.load_search(path), p), facts)[0]


BAD = [
    ('"optim.lrr" = {float = [0.01, 0.1]}', "", "unknown key optim.lrr"),
    ('"model.widht" = {float = [0.5, 1.0]}', "", "unknown option 'widht'"),
    ('"model.width" = {float = [1.2, 0.5]}', "", "reversed"),
    ('"model.width" = {float = [0.5, 0.5]}', "", "empty"),
    ('"data.batch_size" = {choice = []}', "", "choice is empty"),
    ('c9 = {int = [4, 16]}', "", "no recipe string uses {c9}"),
    ('"model.width" = {float = [0.5, 1.2]}', "max_params = 1000", "the smallest has 2,036 params"),
    ('"model.width" = {float = [0.5, 1.2]}', 'objective = "test_acc"', "never on the test set"),
    ('"model.width" = {float = [0.5, 1.2]}', 'objective = ["val_acc", "params"]\npruner = "median"', "prunes single"),
]


@pytest.mark.parametrize("space, search_table, needle", BAD)
def test_bad_search_files_fail_in_one_line_before_training(tmp_path, cli, check, space, search_table, needle):
    path = write_search(tmp_path / "bad.toml", search_table, space)
    out = tmp_path / "out"
    check.one_line_error(*cli("search", path, "--out", out)[::2], needle)
    assert not list(out.glob("trial_*"))


def test_no_validation_split_and_searched_set_are_refused(tmp_path, cli, check):
    path = write_search(tmp_path / "noval.toml", recipe=BASE + TINY.replace("val_split = 1000", "val_split = 0"))
    check.one_line_error(*cli("search", path, "--out", tmp_path / "o")[::2], "no validation split")
    path = write_search(tmp_path / "ok.toml")
    check.one_line_error(*cli("search", path, "--out", tmp_path / "o", "--set", "optim.lr=0.1")[::2],
                          "optim.lr is searched")


def test_unreachable_storage_is_named_with_its_password_masked(tmp_path, cli, check):
    path = write_search(tmp_path / "s.toml")
    rc, _, err = cli("search", path, "--out", tmp_path / "o", "--storage",
                     "postgresql://alice:hunter2@127.0.0.1:1/db")
    check.one_line_error(rc, err, "postgresql://alice:***@127.0.0.1:1/db", "unreachable")
    assert "hunter2" not in err


def test_a_directory_or_storage_holding_another_search_is_refused(searched, tmp_path, cli, check):
    path, out, _ = searched
    before = check.snapshot(out)
    other = write_search(tmp_path / path.name, space=SPACE.replace("0.001", "0.002"))
    check.one_line_error(*cli("search", other, "--out", out)[::2], "holds a different search")
    storage = f"sqlite:///{out / 'study.db'}"
    check.one_line_error(*cli("search", other, "--out", tmp_path / "o", "--storage", storage)[::2],
                          "holds a different study named 'tiny'")
    assert check.snapshot(out) == before and not (tmp_path / "o").exists()  # nothing saved was touched


def test_without_optuna_the_search_says_what_to_install(tmp_path, cli, check, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if the [search] extra were not installed
    path = write_search(tmp_path / "s.toml")
    check.one_line_error(*cli("search", path, "--out", tmp_path / "o")[::2], "pip install 'cnnlab[search]'")


# ----------------------------------------------------------------------------- workers, storage, kill -9


@pytest.fixture(scope="session")
def postgres_url() -> str:
    url = os.environ.get("CNNLAB_TEST_POSTGRES")
    if not url:
        message = ("no PostgreSQL server for the search tests: run them through `make test`, or "
                   "`bash scripts/with-postgres.sh .venv/bin/python -m pytest tests/test_search.py`")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return url


def search_command(path: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cnnlab.cli", "search", str(path), "--out", str(out), *args]


def child_env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), **extra}


def test_two_workers_share_one_study_on_postgresql(postgres_url, tmp_path, capfd):
    name = f"two_{uuid.uuid4().hex[:8]}"
    path = write_search(tmp_path / "pg.toml", SEARCH.replace("trials = 6", f"trials = 6\nname = \"{name}\""))
    out = tmp_path / "out"
    assert main(["search", str(path), "--out", str(out), "--workers", "2", "--storage", postgres_url]) == 0
    printed = capfd.readouterr()
    recs = records(out)
    numbers = [r["number"] for r in recs]
    assert numbers == list(range(len(recs))) and trained_count(out) >= 6  # no number twice, none missing
    workers = {r["attrs"]["worker"] for r in recs if "worker" in r["attrs"]}
    assert len(workers) == 2, workers  # both processes trained trials
    for r in recs:
        assert (out / f"trial_{r['number']:04d}").is_dir() == (r["state"] != "rejected")
    stored = optuna.load_study(study_name=name, storage=postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    assert sorted(t.number for t in stored.trials) == numbers  # every trial recorded in the server
    assert "[worker 1]" in printed.out and "[worker 2]" in printed.out
    password = re.search(r"://[^:]*:([^@]*)@", postgres_url).group(1)
    assert password not in printed.out + printed.err
    assert not [p for p in out.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]


@pytest.mark.parametrize("storage", ["sqlite", "postgresql"])
def test_a_worker_killed_with_sigkill_then_restarted_continues_the_study(storage, tmp_path, request):
    url = request.getfixturevalue("postgres_url") if storage == "postgresql" else None
    name = f"kill_{uuid.uuid4().hex[:8]}"
    path = write_search(tmp_path / "k.toml", f'epochs = 4\ntrials = 2\nheartbeat = 1\nname = "{name}"\nseed = 1\n'
                        'pruner = "none"', '"optim.lr" = {float = [0.01, 0.3], log = true}',
                        BASE + TINY.replace("subset = 2000", "subset = 4000"))
    out = tmp_path / "out"
    args = ["--storage", url] if url else []
    worker = subprocess.Popen(search_command(path, out, *args), env=child_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "trial_0000" / "metrics.jsonl").is_file():  # trial 0 is mid-training
        assert worker.poll() is None and time.monotonic() < deadline, worker.stderr.read() if worker.poll() else "slow"
        time.sleep(0.1)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    worker.stderr.close()
    time.sleep(2.5)  # more than the grace period (2 heartbeats) without a beat
    proc = subprocess.run(search_command(path, out, *args), env=child_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "trial    0  failed: its worker stopped" in proc.stdout
    recs = records(out)
    assert [r["number"] for r in recs] == list(range(len(recs)))  # no number used twice
    assert recs[0]["state"] == "fail" and trained_count(out) == 2
    retried = [r for r in recs[1:] if r["params"] == recs[0]["params"]]
    assert retried and retried[0]["state"] == "complete"  # the killed design ran again as a new trial
