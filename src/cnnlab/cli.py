"""The ``cnnlab`` command: wires the library's modules to subcommands.

Each subcommand is one small function. Bad input raises ``CnnlabError`` in the library; here it
becomes one line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import sys
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
    from cnnlab import summary

    shape = parse_shape(args.input) if args.input else None
    print(summary.summarize(args.model, input_shape=shape).to_text())


def cmd_train(args) -> int:
    from cnnlab import config, train

    if args.resume:
        if args.recipe or args.set:
            raise CnnlabError("--resume continues a run with its saved config; pass only --resume RUN_DIR")
        out = args.resume
        cfg = None
    else:
        if not args.recipe:
            raise CnnlabError("pass a recipe, e.g. cnnlab train recipes/mnist_tiny.toml (or --resume RUN_DIR)")
        cfg = config.load_recipe(args.recipe, args.set)
        if args.quiet:
            cfg.train.quiet = True
        out = args.out or f"runs/{Path(args.recipe).stem}"
    try:
        res = train.train(cfg, out, resume=bool(args.resume), overwrite=args.overwrite)
    except train.Interrupted:
        return 130
    r = res.result
    ttt = f"{r['time_to_target_s']:.1f} s" if r["time_to_target_s"] is not None else "not reached"
    print(f"{r['model']} on {r['dataset']}: final {r['eval_split']} acc {r['final_val_acc']:.2%}, best "
          f"{r['best_val_acc']:.2%}, {r['train_seconds']:.1f} s training, time to target: {ttt}; run: {out}")
    return 0


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
    s.add_argument("model")
    s.add_argument("--input", help="input shape C,H,W (default: the model's own)")
    s.set_defaults(func=cmd_summary)
    t = sub.add_parser("train", help="train a recipe into a run directory")
    t.add_argument("recipe", nargs="?", help="a TOML recipe, e.g. recipes/mnist_tiny.toml")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    t.add_argument("--out", help="run directory (default runs/<recipe name>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last.pt")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except CnnlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
