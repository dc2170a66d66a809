"""The ``cnnlab`` command: wires the library's modules to subcommands.

Each subcommand is one small function. Bad input raises ``CnnlabError`` in the library; here it
becomes one line on stderr and exit code 2, with no traceback. So does an ``OSError`` on a path
the user gave (an argument, the working directory, the data cache); any other ``OSError`` is a bug
and shows its traceback. ``--debug`` (or ``CNNLAB_DEBUG=1``) shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import traceback
from pathlib import Path

from cnnlab.errors import CnnlabError


def cmd_data(args) -> None:
    from cnnlab import data

    if args.action == "get":
        data.get_dataset(args.name, root=args.root, from_path=args.from_path, strict=args.strict)
    else:
        ds = data.load_dataset(args.name, root=args.root, val_split=args.val_split, acquire=False)
        print(data.describe(ds))


def cmd_models(args) -> None:
    from cnnlab import summary

    print(summary.models_table())


def cmd_summary(args) -> None:
    from cnnlab import config, summary

    shape = parse_shape(args.input) if args.input else None
    if args.model.endswith(".toml"):  # a recipe: its model (zoo, layers or Python) for its dataset's images
        if shape is not None:
            raise CnnlabError("--input is for a zoo model; a recipe's model sees its dataset's images "
                              "(change the dataset with --set data.dataset=...)")
        print(summary.recipe_model(config.load_recipe(args.model, args.set))[1].to_text())
        return
    if args.set:
        raise CnnlabError("--set changes a recipe; pass a recipe file (e.g. recipes/mnist_tiny.toml) to use it")
    print(summary.summarize(args.model, input_shape=shape).to_text())


def cmd_train(args) -> int:
    from cnnlab import config, distributed, runs, train

    if args.resume:
        if args.recipe or args.set or args.out or args.overwrite or args.quiet:
            raise CnnlabError("--resume continues a run in its own directory with its saved config; "
                              "pass only --resume RUN_DIR (and --nproc, --backend, --master-port)")
        out = args.resume
        cfg = None
    else:
        if not args.recipe:
            raise CnnlabError("pass a recipe, e.g. cnnlab train recipes/mnist_tiny.toml (or --resume RUN_DIR)")
        cfg = config.load_recipe(args.recipe, args.set)
        if args.quiet:
            cfg.train.quiet = True
        out = args.out or f"runs/{Path(args.recipe).stem}"
    if args.nproc is not None:
        return launch_train(args, cfg, out)
    if args.master_port is not None:
        raise CnnlabError("--master-port goes with --nproc N (cnnlab starts the processes); under your own "
                          "torchrun pass --rdzv-endpoint HOST:PORT to torchrun")
    try:
        with sigterm_as_ctrl_c():
            res = train.train(cfg, out, resume=bool(args.resume), overwrite=args.overwrite, backend=args.backend)
    except train.Interrupted:
        return 130
    except RuntimeError as e:  # only a lost process of a data-parallel job; anything else is a bug: re-raised
        if not distributed.peer_lost(e):
            raise
        if distributed.report_peer_lost():
            print(f"error: rank {distributed.world_from_env().rank}: another process of the job stopped or was killed "
                  f"({str(e).splitlines()[0][:200]}); see its output; continue with: cnnlab train --resume {out}",
                  file=sys.stderr)
        return distributed.LOST_EXIT
    if res.run_dir is None:  # a data-parallel process other than rank 0
        return 0
    r = res.result
    ttt = f"{r['time_to_target_s']:.1f} s" if r["time_to_target_s"] is not None else "not reached"
    print(f"{r['model']} on {r['dataset']}: final {r['eval_split']} acc {runs.final_acc(r):.2%}, best "
          f"{runs.best_acc(r):.2%}, {r['train_seconds']:.1f} s training ({r['wall_seconds']:.1f} s on the wall), "
          f"time to target: {ttt}; run: {out}")
    return 0


def launch_train(args, cfg, out) -> int:
    """``cnnlab train ... --nproc N``: check what can be checked here, then run the same command in N
    processes through torchrun; a process that dies ends the job with one line naming it."""
    from cnnlab import config, data, distributed, runs, train

    run_dir = Path(out).parent if Path(out).is_file() else Path(out)
    if cfg is None:
        cfg = config.from_dict(runs.load_checkpoint(Path(out))["config"])
    else:
        train.check_out_dir(run_dir, args.overwrite)
    distributed.check_launch(cfg, args.nproc, args.backend, args.master_port)
    # fetched and cached here once, rather than by every process at the same time
    data.load_dataset(cfg.data.dataset, root=cfg.data.root or None, val_split=cfg.data.val_split, log=lambda *a: None)
    worker = (["train", "--resume", str(out)] if args.resume else
              ["train", args.recipe, "--out", str(out), *(a for v in args.set for a in ("--set", v)),
               *(["--overwrite"] if args.overwrite else []), *(["--quiet"] if args.quiet else [])])
    try:
        return distributed.launch(args.nproc, [*worker, "--backend", args.backend], args.master_port)
    except distributed.JobFailed as e:
        saved = len(runs.read_metrics(run_dir))
        print(f"error: {e}; " + (f"last.pt holds epoch {saved}: continue with: cnnlab train --resume {run_dir}"
                                 if saved else "no epoch was saved"), file=sys.stderr)
        return 1


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """While training, SIGTERM (``kill PID``, a job scheduler's stop) ends the run as Ctrl-C does:
    the last finished epoch stays in last.pt, result.json says "interrupted", exit code 130."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_lr_find(args) -> None:
    from cnnlab import config, lr_finder, plots

    cfg = config.load_recipe(args.recipe, args.set)
    out = Path(args.out or f"runs/{Path(args.recipe).stem}")
    res = lr_finder.lr_find(cfg, start_lr=args.start, end_lr=args.end, steps=args.steps)
    lr_finder.write(res, out)
    plots.plot_lr_find(res, out / "lr_find.png")
    print(f"suggested lr: {res['suggestion']:.3g} ({len(res['losses'])} steps"
          f"{', stopped at divergence' if res['stopped_early'] else ''}); wrote {out}/lr_find.png and lr_find.json")


def cmd_evaluate(args) -> None:
    from cnnlab import report

    ev = report.evaluate_and_plot(args.run, checkpoint=args.checkpoint, split=args.split, tta=args.tta,
                                  n_images=args.n, layer=args.layer)
    worst = ", ".join(f"{p['true']}->{p['predicted']} ({p['count']})" for p in ev["most_confused"][:3]) or "none"
    tta = report.tta_text(ev)
    print(f"{ev['model']} on {ev['dataset']} {ev['split']} ({ev['n']} images, {ev['checkpoint']}.pt"
          f"{', TTA ' + tta if tta != 'off' else ''}): accuracy {ev['accuracy']:.2%}, balanced accuracy "
          f"{ev['balanced_accuracy']:.2%}; most confused: {worst}")
    print(f"wrote {Path(args.run) / 'eval.json'} and {', '.join(ev['pictures'])}")


def cmd_report(args) -> None:
    from cnnlab import report, search_report

    if search_report.is_search_dir(args.run):
        print(search_report.write_search_report(args.run))
        return
    print(report.write_report(args.run, log=print))


def cmd_search(args) -> int:
    from cnnlab import search, train

    try:
        with sigterm_as_ctrl_c():
            search.run_search(args.search, out=args.out, trials=args.trials, timeout=args.timeout,
                              workers=args.workers, storage=args.storage, overrides=args.set, final=args.final,
                              worker_index=args.worker_index)
    except train.Interrupted:
        return 130
    return 0


def cmd_runs(args) -> None:
    from cnnlab import report

    print(report.runs_table(args.dir, sort_by=args.sort))


def cmd_compare(args) -> None:
    from cnnlab import report

    path, text = report.compare(args.runs, out=args.out)
    print(text)
    print(f"wrote {path}")


def cmd_bench(args) -> None:
    from cnnlab import bench, config, runs

    out = Path(args.out)
    if args.batch_size is not None and (args.throughput is None or args.batch_size < 1):
        raise CnnlabError(f"--batch-size {args.batch_size}: give a batch size >= 1, and only with --throughput "
                          f"(a recipe benchmark uses the recipe's data.batch_size; change it with --set)")
    if args.throughput is not None and (args.set or args.target is not None):
        raise CnnlabError("--throughput measures zoo models, or recipes at their batch size, as they are; "
                          "drop --set and --target (or drop --throughput to benchmark the recipe's training)")
    if args.throughput is not None:
        names = ([args.recipe] if args.recipe else []) + args.throughput
        entries = [config.load_recipe(e) if e.endswith(".toml") else e for e in names]
        rows = bench.throughput(entries or None, batch_size=args.batch_size, device=args.device)
        out.mkdir(parents=True, exist_ok=True)
        runs.write_json(out / "throughput.json", {"rows": rows, "environment": bench.environment()})
        runs.write_text(out / "throughput.md", bench.throughput_markdown(rows) + "\n")
        print(f"wrote {out}/throughput.json and throughput.md")
        return
    if not args.recipe:
        raise CnnlabError("pass a recipe to benchmark, e.g. cnnlab bench recipes/mnist_tiny.toml, or --throughput")
    if args.seeds < 1:
        raise CnnlabError(f"--seeds {args.seeds}: need at least 1 seed, e.g. --seeds 3")
    cfg = config.load_recipe(args.recipe, args.set)
    if args.target is not None:
        cfg.train.target = args.target
        config.validate(cfg)
    if not cfg.train.target:
        raise CnnlabError("no target accuracy: set train.target in the recipe or pass --target, e.g. --target 0.994")
    res = bench.bench_recipe(cfg, list(range(args.seeds)), out / "runs", recipe=str(args.recipe))
    runs.write_json(out / "bench.json", res)
    md = bench.markdown(res)
    sets = "".join(f" --set {v}" for v in args.set) + (f" --target {args.target}" if args.target is not None else "")
    runs.write_text(out / "bench.md", f"`cnnlab bench {args.recipe} --seeds {args.seeds}{sets}`\n\n{md}\n")
    print(md)
    print(f"wrote {out}/bench.json and bench.md")


def cmd_predict(args) -> int:
    from cnnlab import predict

    if args.top < 1:
        raise CnnlabError(f"--top {args.top}: give how many classes to list per image, 1 or more")
    if args.out:
        predict.check_output(args.out)
    clf = predict.load_classifier(args.model, checkpoint=args.checkpoint, tta=args.tta,
                                  mean=parse_floats(args.mean, "--mean"), std=parse_floats(args.std, "--std"),
                                  size=parse_size(args.size))
    files, problems = predict.find_images(args.paths)
    if not files:
        raise CnnlabError(f"nothing to predict: {problems[0]}" + (f" (and {len(problems) - 1} more)" if problems[1:] else ""))
    preds = predict.predict_files(clf, files, batch_size=args.batch_size, top=args.top, invert=args.invert)
    failures = problems + preds.failures
    if not preds.rows:
        raise CnnlabError(f"none of the {len(files)} files is a readable image (first: {failures[0]})")
    if args.out:
        predict.write_predictions(args.out, preds, clf.source)
        print(f"{len(preds.rows)} images predicted by {clf.source}: wrote {args.out}")
    else:
        print(predict.predictions_table(preds.rows))
    note = predict.ground_note(preds, clf.prep, args.invert)
    if note:
        print(note, file=sys.stderr)
    for line in failures:
        print(f"error: {line}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} of the inputs could not be predicted ({len(preds.rows)} were)", file=sys.stderr)
        return 1
    return 0


def cmd_export(args) -> None:
    from cnnlab import export

    export.export_run(args.run, out=args.out, checkpoint=args.checkpoint, int8=args.int8)


def parse_floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or (flag == "--std" and min(values) <= 0):
        raise CnnlabError(f"{flag} {text!r}: expected one number per channel, comma-separated, e.g. 0.1307 or "
                          f"0.485,0.456,0.406{' (all > 0)' if flag == '--std' else ''}")
    return values


def parse_size(text: str | None) -> tuple[int, int] | None:
    """--size: H,W or HxW, or one number for a square input."""
    if text is None:
        return None
    try:
        size = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise CnnlabError(f"--size {text!r}: expected the model's input height and width, e.g. 28 or 32x32")
    return size


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise CnnlabError(f"--input {text!r}: expected C,H,W as three positive integers, e.g. 3,32,32")
    return shape


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cnnlab", description="Train, understand and benchmark compact CNNs.")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of any error (also CNNLAB_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="acquire a dataset or describe it")
    dsub = d.add_subparsers(dest="action", required=True)
    g = dsub.add_parser("get", help="acquire a dataset into the cache")
    g.add_argument("name")
    g.add_argument("--root", help="cache directory (default $CNNLAB_DATA or ~/.cache/cnnlab)")
    g.add_argument("--from", dest="from_path", help="a directory or archive holding the release files")
    g.add_argument("--strict", action="store_true", help="refuse files whose checksums differ from the release")
    i = dsub.add_parser("info", help="sizes, classes, per-channel mean/std and source")
    i.add_argument("name")
    i.add_argument("--root")
    i.add_argument("--val-split", type=int, default=0, help="hold out the last N training images")
    d.set_defaults(func=cmd_data)

    m = sub.add_parser("models", help="table of every model in the zoo")
    m.set_defaults(func=cmd_models)

    s = sub.add_parser("summary", help="per-layer table, parameters, receptive field, MACs")
    s.add_argument("model", help="a zoo model, or a recipe .toml (its model for its dataset, checked against "
                                 "max_params / max_macs)")
    s.add_argument("--input", help="input shape C,H,W (default: the model's own)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    s.set_defaults(func=cmd_summary)
    t = sub.add_parser("train", help="train a recipe into a run directory")
    t.add_argument("recipe", nargs="?", help="a TOML recipe, e.g. recipes/mnist_tiny.toml")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    t.add_argument("--out", help="run directory (default runs/<recipe name>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last.pt")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.add_argument("--nproc", type=int, metavar="N",
                   help="data-parallel: N processes on this machine through torchrun (data.batch_size is the "
                        "global batch; each process gets cores / N threads unless train.threads says)")
    t.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="process group backend: auto (default) is gloo on CPU, NCCL for CUDA tensors")
    t.add_argument("--master-port", type=int, metavar="PORT",
                   help="with --nproc: the rendezvous port on this machine (default: a free one)")
    t.set_defaults(func=cmd_train)

    f = sub.add_parser("lr-find", help="LR range test: suggest a learning rate for a recipe")
    f.add_argument("recipe")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    f.add_argument("--out", help="directory for lr_find.png/json (default runs/<recipe>, where train puts the run)")
    f.add_argument("--steps", type=int, default=200)
    f.add_argument("--start", type=float, default=1e-6)
    f.add_argument("--end", type=float, default=10.0)
    f.set_defaults(func=cmd_lr_find)

    b = sub.add_parser("bench", help="time-to-accuracy over seeds, or training throughput of zoo models")
    b.add_argument("recipe", nargs="?")
    b.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    b.add_argument("--target", type=float, help="target accuracy, e.g. 0.994 (default: the recipe's)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument("--out", default="runs/bench", help="directory for bench.json/bench.md and the runs")
    b.add_argument("--throughput", nargs="*", metavar="MODEL",
                   help="images/s of these zoo models (all if none), or of recipe files at their batch size")
    b.add_argument("--batch-size", type=int, help="batch size for --throughput")
    b.add_argument("--device", default="auto", help="device for --throughput: auto, cpu, cuda")
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("evaluate", help="evaluate a run: eval.json, confusion matrix, misclassified, Grad-CAM")
    e.add_argument("run", help="run directory, e.g. runs/mnist_tiny")
    e.add_argument("--checkpoint", choices=("best", "last"), default="best")
    e.add_argument("--split", choices=("test", "val"), default=None,
                   help="test, or val (the images held out by val_split); default: the split the run was evaluated on")
    e.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average predictions over each image and its mirror (default: as the run was trained)")
    e.add_argument("--layer", help="layer for Grad-CAM and feature maps (default: the last spatial block)")
    e.add_argument("--n", type=int, default=16, help="misclassified images to show (default 16)")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("report", help="write RUN/report.html (evaluates first if needed), or a search's report")
    r.add_argument("run")
    r.set_defaults(func=cmd_report)

    se = sub.add_parser("search", help="architecture and hyper-parameter search under a budget (Optuna)")
    se.add_argument("search", help="a search file, e.g. searches/mnist_budget.toml")
    se.add_argument("--trials", type=int, help="trained trials in the study, all workers together (default: the "
                    "file's [search] trials); rerunning continues up to this number")
    se.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    se.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    se.add_argument("--storage", help="Optuna storage URL, e.g. postgresql://user:pw@host/db (default: "
                    "$CNNLAB_STORAGE, else DIR/study.db)")
    se.add_argument("--out", help="search directory (default runs/search_<name>)")
    se.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a base-recipe key")
    se.add_argument("--final", action="store_true", help="then evaluate the best design once on the test set")
    se.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)  # set by --workers
    se.set_defaults(func=cmd_search)

    ls = sub.add_parser("runs", help="table of the runs in a directory")
    ls.add_argument("dir", nargs="?", default="runs", help="folder of runs (default runs/)")
    ls.add_argument("--sort", default="date", help="name, model, dataset, params, epochs, best_acc, "
                    "time_to_target or date (default)")
    ls.set_defaults(func=cmd_runs)

    c = sub.add_parser("compare", help="overlay the curves of several runs")
    c.add_argument("runs", nargs="+", metavar="RUN")
    c.add_argument("--out", default="compare.png", help="PNG to write (default compare.png)")
    c.set_defaults(func=cmd_compare)

    pr = sub.add_parser("predict", help="classify image files with a run or an ONNX file")
    pr.add_argument("model", help="run directory (e.g. runs/mnist_fast) or .onnx file (from cnnlab export)")
    pr.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or globs")
    pr.add_argument("--out", help="write the predictions to a .csv or .json file instead of the screen")
    pr.add_argument("--top", type=int, default=1, help="classes to list per image (default 1)")
    pr.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                    help="average over each image and its mirror (default: as the run was evaluated)")
    pr.add_argument("--checkpoint", choices=("best", "last"), default="best", help="a run's checkpoint (default best)")
    pr.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    pr.add_argument("--invert", action="store_true",
                    help="read each pixel value v as 255 - v: dark ink on light paper for a model trained on "
                         "light digits on dark (MNIST), or the reverse")
    pr.add_argument("--mean", help="ONNX files not made by cnnlab: per-channel mean on the 0-1 scale, e.g. 0.5,0.5,0.5")
    pr.add_argument("--std", help="ONNX files not made by cnnlab: per-channel std, e.g. 0.25,0.25,0.25")
    pr.add_argument("--size", help="ONNX files not made by cnnlab: input height and width, e.g. 32 or 32x32")
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser("export", help="export a run's model to ONNX, checked in ONNX Runtime (optionally int8)")
    ex.add_argument("run", help="run directory, e.g. runs/mnist_fast")
    ex.add_argument("--format", choices=("onnx",), default="onnx", help="file format (onnx)")
    ex.add_argument("--int8", action="store_true",
                    help="also write an int8 file (static quantization calibrated on training images) and compare it")
    ex.add_argument("--out", help="the .onnx file (default RUN/model.onnx; --int8 adds FILE.int8.onnx)")
    ex.add_argument("--checkpoint", choices=("best", "last"), default="best")
    ex.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("CNNLAB_DEBUG") == "1"
    try:
        code = args.func(args)
    except CnnlabError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permission denied, not a directory, ... : one line if on a path the user gave
        if not on_user_path(e, args):
            raise  # an OSError on cnnlab's own files, or on none, is a bug: its traceback shows where
        if debug:
            traceback.print_exc()
        print(f"error: {e.strerror or e}: {e.filename} (check the path, its permissions and free space; "
              f"--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code or 0


def run() -> None:
    """``cnnlab`` and ``python -m cnnlab``: ``main``, then exit with its code. A process of a torchrun
    job (WORLD_SIZE > 1) exits through ``distributed.end_worker``, never through Python's shutdown,
    where gloo's threads can abort it; an exception that escapes ``main`` there (a bug) still
    prints its traceback and exits 1, as Python would."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # torchrun's variable, read without importing torch
        sys.exit(main())
    from cnnlab import distributed

    try:
        code = main()
    except SystemExit as e:  # argparse: --help, bad arguments
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported in full, as Python's own handler would
        traceback.print_exc()
        code = 1
    distributed.end_worker(code)


def on_user_path(e: OSError, args) -> bool:
    """Whether ``e`` names a file the user pointed cnnlab at (a path argument, the working directory,
    the data cache) rather than one of cnnlab's own files or none at all."""
    from cnnlab.data import data_root

    own = Path(__file__).resolve().parent
    given = [v for v in vars(args).values() if isinstance(v, str)]
    given += [x for v in vars(args).values() if isinstance(v, list) for x in v if isinstance(x, str)]
    roots = [Path(p).expanduser().resolve() for p in (Path.cwd(), data_root(), *given)]
    for name in (e.filename, e.filename2):
        if isinstance(name, (str, bytes, os.PathLike)) and name:
            path = Path(os.fsdecode(name)).expanduser().resolve()
            if not path.is_relative_to(own) and any(path.is_relative_to(r) for r in roots):
                return True
    return False


if __name__ == "__main__":
    sys.exit(main())
