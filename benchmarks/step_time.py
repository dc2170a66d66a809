"""Training time per image of recipe variants, measured taking turns in one process.

This host's speed moves by 10-40% from one quarter hour to the next, so two variants timed one
after the other are not a ratio. Here every variant is set up once (``train.setup``: its data,
model, optimizer, dtype and layout), then each in turn trains on ``--images`` images of its own
loader (forward, backward, optimizer step, the loader's batches included), for ``--turns`` turns.
The first turn is warm-up; the medians of the others, and their ratio to the first variant, are
printed.

    python benchmarks/step_time.py recipes/mnist_speedrun.toml \
        "recipes/mnist_speedrun.toml:data.batch_size=128" my_variant.toml

A variant is ``RECIPE[:KEY=VALUE,KEY=VALUE...]``, the keys as ``--set`` takes them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cnnlab import config, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+", help="RECIPE[:KEY=VALUE,...]")
    ap.add_argument("--images", type=int, default=5120, help="images per variant per turn")
    ap.add_argument("--turns", type=int, default=12)
    args = ap.parse_args()
    setups = []
    for variant in args.variants:
        path, _, sets = variant.partition(":")
        cfg = config.load_recipe(path, [s for s in sets.split(",") if s])
        s = train.setup(cfg, log=lambda *a: None)
        s.model.train()
        setups.append([variant, s, s.train_loader.epoch(s.gen, 1)])
    times = [[] for _ in setups]
    for _ in range(args.turns):
        for k, (variant, s, batches) in enumerate(setups):
            seen, t0 = 0, time.perf_counter()
            while seen < args.images:
                x, y = next(batches, (None, None))
                if x is None:  # a new epoch of this variant's loader
                    setups[k][2] = batches = s.train_loader.epoch(s.gen, 1)
                    x, y = next(batches)
                s.optimizer.zero_grad(set_to_none=True)
                train.accumulate_gradients(s.forward, x, y, s.dtype, s.cfg.train.micro_batch, s.scaler,
                                           s.cfg.optim.label_smoothing)
                train.optimizer_step(s.model, s.optimizer, s.scaler, s.cfg.optim.grad_clip)
                seen += len(y)
            times[k].append((time.perf_counter() - t0) / seen * 1e6)
    base = statistics.median(times[0][1:])
    print("| variant | us per image (median) | vs the first | turns (us per image) |")
    print("| --- | ---: | ---: | --- |")
    for (variant, _, _), ts in zip(setups, times):
        m = statistics.median(ts[1:])
        print(f"| `{variant}` | {m:.1f} | {m / base:.2f}x | {', '.join(f'{t:.0f}' for t in sorted(ts[1:]))} |")


if __name__ == "__main__":
    main()
