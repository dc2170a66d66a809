"""The HTML report (issue 5), rendered in a real headless browser; ``cnnlab runs`` and ``compare``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from cnnlab.cli import main
from test_evaluate import PICTURES, assert_png

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
# Appended to a copy of the report only (the report itself has no script): after load, the page
# title becomes the naturalWidth of every image (0 = the image did not decode).
PROBE = ("<script>window.addEventListener('load', function () { document.title = JSON.stringify("
         "Array.from(document.images).map(function (i) { return i.naturalWidth; })); });</script>")


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.fail("chromium is not installed; the report test renders report.html in it: "
                    "run `bash scripts/install-system.sh` (CI installs it)")
    return exe


def run_chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="cnnlab-chromium-") as profile:
        return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def reported(tmp_path_factory, mnist_run) -> tuple[Path, Path]:
    """A copy of the tiny run with no eval.json: ``cnnlab report`` must evaluate it first."""
    run = tmp_path_factory.mktemp("report") / "tiny"
    shutil.copytree(mnist_run, run)
    for name in ("eval.json", *PICTURES):
        (run / name).unlink(missing_ok=True)
    rc = main(["report", str(run)])
    assert rc == 0
    return run, run / "report.html"


def test_report_evaluates_first_and_is_self_contained(reported):
    run, path = reported
    assert path.is_file()
    ev = json.loads((run / "eval.json").read_text())
    # the default evaluation: the split the run was evaluated on while training (its 1,000-image val split)
    assert ev["split"] == "val" and ev["n"] == 1000
    for name in PICTURES:
        assert_png(run / name)
    text = path.read_text()
    assert "<script" not in text.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", text, re.I)
    srcs = re.findall(r'<img src="([^"]*)"', text)
    assert len(srcs) == len(PICTURES) and all(s.startswith("data:image/png;base64,") for s in srcs)
    order = [text.index(h) for h in ("What was trained", "How training went", "Where it fails", "Why")]
    assert order == sorted(order)
    assert "lr_find.png" not in text


def test_report_renders_in_headless_chromium(reported, tmp_path):
    run, path = reported
    result = json.loads((run / "result.json").read_text())
    ev = json.loads((run / "eval.json").read_text())
    probe = tmp_path / "probe.html"
    probe.write_text(path.read_text().replace("</body>", PROBE + "</body>"))
    proc = run_chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    title = re.search(r"<title>(.*?)</title>", proc.stdout, re.S)
    assert title, proc.stdout[:500]
    widths = json.loads(title.group(1))
    assert len(widths) == len(PICTURES) and all(w > 0 for w in widths), widths
    dom = proc.stdout
    final = f"{100 * result['final_val_acc']:.2f}%"
    assert final in dom, final
    assert f"{result['params']:,}" in dom  # 13,840 parameters
    assert f"{100 * ev['accuracy']:.2f}%" in dom and f"{100 * ev['balanced_accuracy']:.2f}%" in dom

    shot = tmp_path / "shot.png"
    proc = run_chromium("--screenshot=" + str(shot), "--window-size=1280,4000", path.as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 4000)
        stat = ImageStat.Stat(im.convert("L"))
        assert stat.stddev[0] > 20, stat.stddev  # text, tables and pictures, not a blank page
        colours = im.convert("RGB").resize((320, 1000)).getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 500


def test_report_includes_lr_find_when_present(reported, tmp_path):
    run, _ = reported
    copy = tmp_path / "with-lr-find"
    shutil.copytree(run, copy)
    shutil.copyfile(copy / "curves.png", copy / "lr_find.png")  # any PNG stands in for the finder's plot
    assert main(["report", str(copy)]) == 0
    text = (copy / "report.html").read_text()
    assert "Learning-rate finder" in text
    assert len(re.findall(r'<img src="data:image/png;base64,', text)) == len(PICTURES) + 1


def test_runs_table_and_compare(reported, tmp_path, cli, check):
    run, _ = reported
    root = tmp_path / "runs"
    root.mkdir()
    shutil.copytree(run, root / "a")
    shutil.copytree(run, root / "b")
    result = json.loads((root / "b" / "result.json").read_text())
    result["best_val_acc"] = 0.999
    (root / "b" / "result.json").write_text(json.dumps(result))
    (root / "not-a-run").mkdir()
    rc, out, err = cli("runs", root, "--sort", "best_acc")
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["name", "model", "dataset", "params"]
    assert [ln.split()[0] for ln in lines[2:]] == ["b", "a"]  # best accuracy first
    assert "99.90%" in lines[2] and "13,840" in lines[2] and "mnist_tiny" in lines[2]
    check.one_line_error(*cli("runs", root, "--sort", "colour")[::2], "best_acc")
    check.one_line_error(*cli("runs", tmp_path / "missing")[::2], "no such directory")

    png = tmp_path / "cmp.png"
    rc, out, err = cli("compare", root / "a", root / "b", "--out", png)
    assert rc == 0, err
    assert_png(png)
    assert "a " in out and "b " in out and str(png) in out
    check.one_line_error(*cli("compare", root / "a", root / "not-a-run")[::2], "not a cnnlab run")


def test_report_bad_input(tmp_path, cli, check):
    check.one_line_error(*cli("report", tmp_path)[::2], "not a cnnlab run")
