"""The report of a search: ``cnnlab report SEARCH_DIR`` writes ``SEARCH_DIR/report.html``.

One self-contained page (pictures as data URIs, inline CSS, no script), drawn from the files a
search leaves: ``search.json``, ``trials.json`` (the study as data), ``best_recipe.toml`` and,
after ``--final``, ``final/eval.json``. It reads no storage and needs no Optuna, so it works on a
copy of the directory. Every accuracy is labelled with its split: validation for the search,
test only for the one ``--final`` evaluation.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from cnnlab import jsonfile, plots, runs
from cnnlab.errors import CnnlabError
from cnnlab.report import CSS, _esc, _pct, image_tag, numbers, table

PICTURES = ("tradeoff.png", "history.png", "importances.png")


def is_search_dir(path: str | Path) -> bool:
    return (Path(path) / "search.json").is_file()


def read(path: Path) -> dict:
    try:
        return jsonfile.read_object(path, "rerun the search command to rewrite it")
    except OSError as e:
        raise CnnlabError(f"{path}: unreadable ({type(e).__name__}); rerun the search command to rewrite it") from None


def pareto_front(trials: list[dict], size_key: str = "params") -> list[dict]:
    """The finished trials no other beats on both validation accuracy and size, smallest first."""
    front, best_acc = [], -1.0
    done = [r for r in trials if r["state"] == "complete"]
    for r in sorted(done, key=lambda r: (r["attrs"][size_key], -r["val_acc"])):
        if r["val_acc"] > best_acc:
            front.append(r)
            best_acc = r["val_acc"]
    return front


def section_numbers(info: dict, data: dict, best: dict | None, final: dict | None) -> str:
    c = data["counts"]
    budget = ", ".join(f"{k} {data[k]:,}" for k in ("max_params", "max_macs") if data.get(k)) or "none"
    items = [("objective", " + ".join(data["objectives"])), ("budget", budget),
             ("epochs per trial", data["epochs"]), ("pruner", data["pruner"]),
             ("trials", f"{c['complete']} trained, {c['pruned']} pruned, {c.get('diverged', 0)} diverged, "
                        f"{c['rejected']} rejected, {c['fail']} failed")]
    if best is not None:
        items += [("best trial", best["number"]), ("best validation accuracy", _pct(best["val_acc"])),
                  ("best design's params", f"{best['attrs']['params']:,}")]
    items.append(("test accuracy (--final)", _pct(final["accuracy"]) if final else "not evaluated"))
    where = (f"<p>Every accuracy in the plots and the trials table is <b>validation</b> accuracy, on "
             f"{data['val_split']:,} images held out of the training set (<code>data.val_split</code>): the "
             f"search selected on them and never saw the test set. ")
    if final:
        where += (f"The <b>test</b> accuracy is trial {_esc(Path(final['run']).name)}'s final weights "
                  f"(<code>{_esc(final['checkpoint'])}.pt</code>) evaluated once on the {final['n']:,} test images "
                  f"after the search (<code>--final</code>).</p>")
    else:
        where += "The best design has not been evaluated on the test set (rerun with <code>--final</code>).</p>"
    target = (f"<p>Best = the fewest params reaching {_pct(data['target'])} validation accuracy, else the most "
              f"accurate.</p>" if data.get("target") else "")
    return f"<h2>1. The search</h2>{numbers(items)}{where}{target}"


def section_plots(out: Path, data: dict, best: dict | None) -> str:
    size_key = data["objectives"][1] if len(data["objectives"]) > 1 else "params"
    budget = data.get("max_macs") if size_key == "macs" else data.get("max_params")
    trials = data["trials"]
    plots.plot_tradeoff(trials, pareto_front(trials, size_key), best, budget, out / "tradeoff.png", size_key)
    plots.plot_search_history(trials, out / "history.png")
    parts = ["<h2>2. Accuracy against size</h2>",
             image_tag(out / "tradeoff.png", "validation accuracy against parameters, Pareto front and budget"),
             "<h2>3. Optimisation history</h2>", image_tag(out / "history.png", "validation accuracy per trial"),
             "<h2>4. What mattered</h2>"]
    imp = data.get("importances") or {}
    if imp:
        plots.plot_importances(imp, out / "importances.png")
        parts += [image_tag(out / "importances.png", "parameter importances"),
                  table(["key", "importance"], [[k, f"{v:.3f}"] for k, v in imp.items()])]
    else:
        (out / "importances.png").unlink(missing_ok=True)
        parts.append("<p>Parameter importances need at least two finished trials with different designs.</p>")
    return "".join(parts)


def section_recipe(out: Path, best: dict | None) -> str:
    path = out / "best_recipe.toml"
    if best is None or not path.is_file():
        return "<h2>5. Best trial's recipe</h2><p>No trial has finished yet.</p>"
    return (f"<h2>5. Best trial's recipe</h2><p>Trial {best['number']} (<code>{_esc(best['attrs']['run'])}</code>); "
            f"reproduce it with <code>cnnlab train {_esc(path)}</code>.</p><pre>{_esc(path.read_text())}</pre>")


def section_trials(data: dict) -> str:
    keys = [d["key"] for d in data["space"]]
    body = []
    for r in data["trials"]:
        a = r["attrs"]
        state = {"rejected": f"rejected: {a.get('rejected')}", "pruned": f"pruned at epoch {a.get('epochs', '?')}",
                 "diverged": f"diverged: {a.get('diverged')}"}.get(r["state"], r["state"])
        body.append([r["number"], state, _pct(r["val_acc"]) if r["val_acc"] is not None else "-",
                     f"{a['params']:,}" if "params" in a else "-", f"{a['macs']:,}" if "macs" in a else "-",
                     a.get("epochs", "-"), f"{a['seconds']:.1f}" if "seconds" in a else "-",
                     *[f"{r['params'][k]:.4g}" if isinstance(r["params"].get(k), float) else r["params"].get(k, "-")
                       for k in keys], a.get("run", "-")])
    head = ["trial", "state", "validation acc", "params", "MACs", "epochs", "train s", *keys, "run"]
    return f"<h2>6. All trials</h2>{table(head, body)}"


def write_search_report(out: str | Path) -> Path:
    """Write SEARCH_DIR/report.html (and its pictures) from the search's files."""
    out = Path(out)
    info = read(out / "search.json")
    if not (out / "trials.json").is_file():
        raise CnnlabError(f"{out}: the search has no trials.json yet; run the search command first")
    data = read(out / "trials.json")
    best = next((r for r in data["trials"] if r["number"] == data["best"]), None)
    final = read(out / "final" / "eval.json") if (out / "final" / "eval.json").is_file() else None
    title = f"cnnlab search report: {info['name']}"
    when = datetime.now().isoformat(timespec="seconds")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_esc(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{_esc(title)}</h1>"
            f"<p class=\"note\">search file {_esc(info['file'])}; directory {_esc(out)}; storage "
            f"{_esc(info['storage'])}; study snapshot {_esc(data['updated'])}; report written {when}.</p>"
            + section_numbers(info, data, best, final) + section_plots(out, data, best) + section_recipe(out, best)
            + section_trials(data) + "</body></html>\n")
    path = out / "report.html"
    runs.write_text(path, page)
    return path
