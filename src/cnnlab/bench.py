"""Time-to-accuracy benchmarks in the spirit of DAWNBench, and raw training throughput.

``bench_recipe`` trains a recipe once per seed and reports the training time to the target
accuracy (evaluation excluded and data already cached, as airbench counts it; unlike airbench,
no warm-up run, so one-off costs such as ``torch.compile`` count in the first epoch), final accuracy,
training images/s, seconds per epoch and peak memory. ``throughput`` times forward+backward
steps of zoo models under each precision / memory-format setting.
"""

from __future__ import annotations

import copy
import math
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cnnlab import allocator, models, runs
from cnnlab.config import Config
from cnnlab.evaluate import DTYPES, autocast
from cnnlab.models import create_model, get_spec, list_models
from cnnlab.summary import data_facts, summarize
from cnnlab.tables import format_table
from cnnlab.train import accumulate_gradients, resolve_device, sync, torch_threads, train

# Training FLOPs per image = 6 x MACs: the forward pass is 2 FLOPs per MAC, the backward pass twice
# the forward (gradients for inputs and for weights); element-wise work (BN, ReLU) is not counted.
TRAIN_FLOPS_PER_MAC = 6


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_gflops(dtype: str = "bfloat16", device: str = "cpu", n: int = 2048, repeats: int = 5) -> float:
    """The machine's practical peak: GFLOP/s of an n x n matmul in ``dtype`` (median of ``repeats``)."""
    a = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    times = []
    for i in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def copy_bandwidth_gbs(repeats: int = 5, clock=time.perf_counter, mib: int = 256) -> float:
    """The machine's memory bandwidth as GB/s of a large tensor copy, counting the bytes read and the
    bytes written (median of ``repeats``)."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = clock()
        dst.copy_(src)
        times.append(clock() - t0)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def interleaved_step_times(setups: dict, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, repeats: int,
                           clock=time.perf_counter) -> dict:
    """Median seconds of a training step (forward, backward, optimizer step) for each ``name: (model,
    optimizer)`` of ``setups`` on the same batch, the setups taking turns step by step (so a change
    in the machine's load hits all alike); a first round warms up."""
    times = {name: [] for name in setups}
    for i in range(repeats + 1):
        for name, (model, opt) in setups.items():
            t0 = clock()
            with autocast(x.device, dtype):
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i:
                times[name].append(clock() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def train_gflops(macs_per_image: int, images_per_s: float) -> float:
    return TRAIN_FLOPS_PER_MAC * macs_per_image * images_per_s / 1e9


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "median": None, "min": None, "max": None}
    return {"mean": statistics.fmean(values), "median": statistics.median(values), "min": min(values), "max": max(values)}


def time_to_target_stats(times: list[float | None]) -> dict:
    """Statistics of time to target where None (not reached) counts as infinitely slow: the median
    exists only if at least half the seeds reached it; mean and max only if all did."""
    reached = [t for t in times if t is not None]
    every = len(reached) == len(times) and bool(times)
    median = statistics.median([math.inf if t is None else t for t in times]) if times else math.inf
    return {"mean": statistics.fmean(reached) if every else None,
            "median": median if math.isfinite(median) else None,
            "min": min(reached) if reached else None, "max": max(reached) if every else None}


def bench_recipe(cfg: Config, seeds: list[int], out: Path | None = None, log=print, recipe: str | None = None) -> dict:
    """Train ``cfg`` once per seed (quietly) and summarise time-to-target and accuracy."""
    per_seed = []
    for seed in seeds:
        c = copy.deepcopy(cfg)
        c.train.seed = seed
        c.train.quiet = True
        run_dir = out / f"seed{seed}" if out is not None else None
        res = train(c, run_dir, overwrite=True).result
        macs = res["macs_per_image"]
        row = {
            "seed": seed,
            "eval_split": res["eval_split"],
            "final_acc": runs.final_acc(res),
            "best_acc": runs.best_acc(res),
            "epochs_run": res["epochs_run"],
            "train_seconds": res["train_seconds"],
            "wall_seconds": res["wall_seconds"],
            "time_to_target_s": res["time_to_target_s"],
            "target_epoch": res["target_epoch"],
            "seconds_per_epoch": res["train_seconds"] / max(1, res["epochs_run"]),
            "train_images_per_s": res["images_trained"] / max(res["train_seconds"], 1e-9),
            "reached": res["time_to_target_s"] is not None,
        }
        row["train_gflops"] = train_gflops(macs, row["train_images_per_s"])
        per_seed.append(row)
        log(f"seed {seed}: final {row['final_acc']:.2%}, time to target "
            f"{'%.1f s' % row['time_to_target_s'] if row['reached'] else 'not reached'}, "
            f"{row['seconds_per_epoch']:.1f} s/epoch, {row['train_images_per_s']:.0f} img/s")
    n_reached = sum(r["reached"] for r in per_seed)
    with torch_threads(cfg.train.threads):  # the peak and the environment as the runs had them
        peak = matmul_peak_gflops(cfg.train.dtype, str(resolve_device(cfg.train.device)))
        env = environment(cfg)
    return {
        "recipe": recipe, "model": cfg.model.name, "dataset": cfg.data.dataset,
        "target": cfg.train.target or None, "seeds": seeds, "runs": per_seed,
        "reached": f"{n_reached}/{len(per_seed)}",
        "time_to_target_s": time_to_target_stats([r["time_to_target_s"] for r in per_seed]),
        "final_acc": _stats([r["final_acc"] for r in per_seed]),
        "seconds_per_epoch": _stats([r["seconds_per_epoch"] for r in per_seed]),
        "wall_over_train": _stats([r["wall_seconds"] / max(r["train_seconds"], 1e-9) for r in per_seed]),
        "train_images_per_s": _stats([r["train_images_per_s"] for r in per_seed]),
        "macs_per_image": macs,
        "train_gflops": _stats([r["train_gflops"] for r in per_seed]),
        "peak_gflops": peak,
        "peak_rss_mb": peak_rss_mb(),
        "environment": env,
    }


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows: hosts differ, say which."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(cfg: Config | None = None) -> dict:
    env = {"torch_version": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "git_commit": runs.git_commit()}
    if cfg is not None:
        env.update(device=cfg.train.device, dtype=cfg.train.dtype, channels_last=cfg.train.channels_last,
                   compile=cfg.train.compile, batch_size=cfg.data.batch_size)
    return env


def markdown(result: dict) -> str:
    def fmt(v, pct=False, unit=""):
        if v is None:
            return "-"
        return f"{100 * v:.2f}%" if pct else f"{v:.1f}{unit}"

    split = result["runs"][0].get("eval_split", "val") if result["runs"] else "val"
    head = ["seed", f"final {split} acc", f"time to {fmt(result['target'], True)} (s)", "epochs", "s/epoch",
            "train img/s", "train s", "wall s"]
    body = [[r["seed"], fmt(r["final_acc"], True), fmt(r["time_to_target_s"]), r["epochs_run"],
             fmt(r["seconds_per_epoch"]), fmt(r["train_images_per_s"]), fmt(r["train_seconds"]),
             fmt(r["wall_seconds"])] for r in result["runs"]]
    t, a, w = result["time_to_target_s"], result["final_acc"], result["wall_over_train"]
    body.append(["**median**", fmt(a["median"], True), fmt(t["median"]), "", fmt(result["seconds_per_epoch"]["median"]),
                 fmt(result["train_images_per_s"]["median"]), "", f"{w['median']:.2f}x train"])
    env = result["environment"]
    lines = [format_table(head, body, left=(), markdown=True), ""]
    g = result["train_gflops"]["median"]
    lines.append(f"training compute: {result['macs_per_image']:,} MACs/image x {TRAIN_FLOPS_PER_MAC} = {g:.1f} GFLOP/s (median), "
                 f"{100 * g / result['peak_gflops']:.1f}% of this machine's {result['environment'].get('dtype')} "
                 f"2048x2048 matmul ({result['peak_gflops']:.0f} GFLOP/s)")
    lines.append("")
    lines.append(f"reached target: {result['reached']}; peak RSS {result['peak_rss_mb']:.0f} MiB; device {env.get('device')}, "
                 f"dtype {env.get('dtype')}, channels_last {env.get('channels_last')}, threads {env['threads']}, "
                 f"torch {env['torch_version']}, {env.get('cuda') or env.get('cpu')}, commit {(env['git_commit'] or '?')[:10]}")
    return "\n".join(lines)


def _job(entry: str | Config, batch_size: int | None) -> tuple:
    """(name, model maker, input shape, classes, batch size, micro-batch) of a zoo name or a recipe's Config."""
    if isinstance(entry, Config):
        shape, num_classes, _ = data_facts(entry.data)
        models.build(entry.model.name, entry.model.options, num_classes, shape)  # bad input fails here, once

        def make():
            return models.build(entry.model.name, entry.model.options, num_classes, shape)

        return (models.label(entry.model.name), make, shape, num_classes, batch_size or entry.data.batch_size,
                entry.train.micro_batch)
    spec = get_spec(entry)
    default_bs = 128 if spec.input_shape[0] == 1 else 256
    return spec.name, lambda: create_model(spec.name), spec.input_shape, spec.num_classes, batch_size or default_bs, 0


def throughput(entries: list[str | Config] | None = None, batch_size: int | None = None, steps: int = 10,
               settings=(("float32", False), ("float32", True), ("bfloat16", False), ("bfloat16", True)),
               device: str = "auto", log=print) -> list[dict]:
    """Forward+backward+SGD images/s of zoo models per (dtype, channels_last) setting.

    An entry of ``entries`` is a zoo name (batch 128 for 1-channel input, else 256) or a recipe's
    ``Config`` (its model, whatever kind, for its dataset's images, at its batch size, in its
    ``train.micro_batch`` chunks); ``batch_size`` overrides either. A
    model's settings take turns step by step and each reports its median step, so a change in the
    machine's load hits all of them alike and their ratios hold. Freed memory is kept, as in training
    (``allocator.keep_freed_memory``)."""
    allocator.keep_freed_memory()
    device = str(resolve_device(device))
    jobs = [_job(entry, batch_size) for entry in entries or list_models()]  # all checked before any timing
    peaks = {d: matmul_peak_gflops(d, device) for d in sorted({d for d, _ in settings})}
    rows = []
    for name, make, shape, num_classes, bs, micro in jobs:
        macs = summarize(make(), input_shape=shape).macs
        torch.manual_seed(0)
        x = torch.randn(bs, *shape, device=device)
        y = torch.randint(0, num_classes, (bs,), device=device)
        setups = []  # one (model, optimizer, input, dtype) per setting
        for dtype_name, cl in settings:
            torch.manual_seed(0)
            model = make().to(device)
            models.init_from_data(model, x)
            xs = x.contiguous(memory_format=torch.channels_last) if cl else x
            if cl:
                model = model.to(memory_format=torch.channels_last)
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
            setups.append((model, opt, xs, DTYPES[dtype_name]))
        times = [[] for _ in settings]
        no_scaling = torch.amp.GradScaler(torch.device(device).type, enabled=False)
        for i in range(steps + 1):
            for k, (model, opt, xs, dtype) in enumerate(setups):
                sync(device)
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                accumulate_gradients(model, xs, y, dtype, micro, no_scaling)  # as train_epoch does
                opt.step()
                sync(device)
                if i:  # the first round warms up
                    times[k].append(time.perf_counter() - t0)
        for (dtype_name, cl), t in zip(settings, times):
            sec = statistics.median(t)
            row = {"model": name, "batch_size": bs, "micro_batch": micro, "dtype": dtype_name, "channels_last": cl,
                   "ms_per_step": 1000 * sec, "images_per_s": bs / sec, "macs_per_image": macs}
            row["gflops"] = train_gflops(macs, row["images_per_s"])
            row["pct_of_peak"] = 100 * row["gflops"] / peaks[dtype_name]
            row["peak_gflops"] = peaks[dtype_name]
            rows.append(row)
            log(f"{name:14s} bs {bs:4d}{f' in {micro}s' if micro else ''} {dtype_name:9s} {'channels_last' if cl else 'NCHW':13s} "
                f"{row['ms_per_step']:9.1f} ms/step {row['images_per_s']:9.0f} img/s {row['gflops']:7.1f} GFLOP/s "
                f"({row['pct_of_peak']:.0f}% of matmul peak)")
    return rows


def throughput_markdown(rows: list[dict]) -> str:
    head = ["model", "batch", "dtype", "layout", "ms/step", "img/s", "GFLOP/s", "% of matmul peak"]
    body = [[r["model"], f"{r['batch_size']} in {r['micro_batch']}s" if r["micro_batch"] else r["batch_size"], r["dtype"], "channels_last" if r["channels_last"] else "NCHW",
             f"{r['ms_per_step']:.1f}", f"{r['images_per_s']:.0f}", f"{r['gflops']:.1f}", f"{r['pct_of_peak']:.1f}"]
            for r in rows]
    return format_table(head, body, left=(0, 2, 3), markdown=True)
