"""Run directories: what a training run leaves behind, written atomically, read back checked.

``runs/NAME/`` holds ``config.toml`` (the resolved recipe), ``metrics.jsonl`` (one JSON object
per epoch), ``result.json`` (the outcome), ``last.pt`` and ``best.pt`` (checkpoints that carry
the model name, options and config needed to rebuild the model) and ``summary.txt``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from cnnlab import jsonfile
from cnnlab.atomic import atomic_torch_save, atomic_write_bytes
from cnnlab.errors import CnnlabError
from cnnlab.models import build, source_changed


def existing_run(run_dir) -> Path:
    """``run_dir`` as a Path, after checking it is a run directory made by ``cnnlab train``."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise CnnlabError(f"{run_dir}: a file, not a run directory; pass a directory made by `cnnlab train`")
    if not run_dir.is_dir():
        raise CnnlabError(f"{run_dir}: no such run directory; list runs with `cnnlab runs`")
    if not (run_dir / "config.toml").is_file():
        raise CnnlabError(f"{run_dir}: not a cnnlab run (no config.toml); pass a directory made by `cnnlab train`")
    return run_dir


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_metrics(run: Path, rows: list[dict]) -> None:
    """Rewrite metrics.jsonl with ``rows`` (whole file, atomically: a resumed run stays consistent)."""
    atomic_write_bytes(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    return jsonfile.read_lines(path, "re-run `cnnlab train` for this run")


def read_result(run: Path) -> dict:
    path = Path(run) / "result.json"
    if not path.is_file():
        raise CnnlabError(f"{run}: not a cnnlab run (no result.json); pass a directory made by `cnnlab train`")
    return jsonfile.read_object(path, "re-run `cnnlab train` for this run")


def is_run(path: Path) -> bool:
    path = Path(path)
    return (path / "config.toml").is_file() and ((path / "result.json").is_file() or (path / "last.pt").is_file())


# The checkpoint schema, one place: what rebuilds the model (with the type each must have, checked
# when a file is loaded), then what continues training exactly.
REBUILD_KEYS = {"model_name": str, "model_options": dict, "num_classes": int, "config": dict, "dataset": dict}
RESUME_KEYS = ("epoch", "state_dict", "optimizer", "ema_state_dict", "lookahead", "rng", "scaler", "history", "state",
               "hard_scores")


def checkpoint(*, model_name: str, model_options: dict, num_classes: int, config: dict, dataset: dict, epoch: int,
               state_dict: dict, optimizer: dict | None = None, ema_state_dict: dict | None = None,
               lookahead: list | None = None, rng: dict | None = None, scaler: dict | None = None,
               history: list | None = None, state: dict | None = None, hard_scores=None, **extra) -> dict:
    """A checkpoint (``last.pt``/``best.pt``): ``model_name``, ``model_options``, ``num_classes`` and
    ``config`` rebuild the model; ``dataset`` (``dataset_facts``) is what its inputs were (name, classes,
    mean, std, shape, eval_split); ``epoch`` (completed), weights (``state_dict``, ``ema_state_dict``),
    ``optimizer``, airbench's ``lookahead`` average, ``rng`` and fp16 ``scaler`` states, ``history``
    (the metrics rows), ``state`` (the loop's counters) and ``hard_scores`` (each training image's
    hardness in the first epoch, with ``train.hard_fraction``) continue training exactly. ``extra``: what a
    model from outside the zoo needs to be rebuilt (see models)."""
    return {"model_name": model_name, "model_options": model_options, "num_classes": num_classes,
            "config": config, "dataset": dataset, "epoch": epoch, "state_dict": state_dict,
            "optimizer": optimizer, "ema_state_dict": ema_state_dict, "lookahead": lookahead, "rng": rng,
            "scaler": scaler, "history": list(history or []), "state": dict(state or {}),
            "hard_scores": hard_scores, **extra}


def dataset_facts(ds) -> dict:
    """What a checkpoint records of its dataset: enough to prepare new images exactly as in training."""
    return {"name": ds.name, "classes": list(ds.classes), "mean": list(ds.mean), "std": list(ds.std),
            "shape": list(ds.shape), "eval_split": ds.test_name}


def save_checkpoint(path: Path, ckpt: dict) -> None:
    atomic_torch_save(ckpt, path)


def acc_key(split: str) -> str:
    """The metrics/result key of accuracy on ``split`` ("val" or "test")."""
    return f"{split}_acc"


def eval_split(result: dict) -> str:
    """The split a run was evaluated on while training ("val" or "test"), from its result.json."""
    return result.get("eval_split") or "val"


def best_acc(result: dict) -> float | None:
    return result.get(f"best_{eval_split(result)}_acc")


def final_acc(result: dict) -> float | None:
    return result.get(f"final_{eval_split(result)}_acc")


def load_checkpoint(run: Path, which: str = "last") -> dict:
    """Read ``last.pt`` or ``best.pt`` of a run (or a checkpoint file path)."""
    run = Path(run)
    if which not in ("last", "best"):
        raise CnnlabError(f"--checkpoint {which!r}: expected 'best' or 'last'")
    path = run if run.is_file() else run / f"{which}.pt"
    if not run.exists():
        raise CnnlabError(f"{run}: no such run directory; list runs with `cnnlab runs`")
    instead = ("last.pt is there (evaluate, predict and export take --checkpoint last), or "
               if which == "best" and (run / "last.pt").is_file() else "")
    if not path.is_file():
        raise CnnlabError(f"{run}: no checkpoint {path.name}; {instead}train the run with `cnnlab train`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only: no code runs
    except Exception as e:  # torch raises many types for damaged files
        raise CnnlabError(f"{path}: damaged checkpoint ({type(e).__name__}); {instead}re-run training") from None
    problem = checkpoint_problem(ckpt)
    if problem:
        raise CnnlabError(f"{path}: not a cnnlab checkpoint ({problem}); expected a file made by `cnnlab train`")
    return ckpt



def checkpoint_problem(ckpt) -> str | None:
    """What makes ``ckpt`` unusable as a checkpoint (a missing key, a wrong type, dataset facts that
    do not fit the model), or None."""
    if not isinstance(ckpt, dict):
        return f"a {type(ckpt).__name__}, expected a dict"
    for key, kind in {**REBUILD_KEYS, "state_dict": dict}.items():
        if key not in ckpt:
            return f"no {key}"
        if not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            return f"{key} is a {type(ckpt[key]).__name__}, expected {kind.__name__}"
    facts, n = ckpt["dataset"], ckpt["num_classes"]
    shape, classes = facts.get("shape"), facts.get("classes")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        return f"dataset shape {shape!r}, expected [channels, height, width]"
    if not (isinstance(classes, list) and len(classes) == n and all(isinstance(c, str) for c in classes)):
        return f"dataset classes {classes!r} do not name its {n} classes"
    for key in ("mean", "std"):
        values = facts.get(key)
        if not (isinstance(values, list) and len(values) == shape[0]
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            return f"dataset {key} {values!r}, expected one number per channel"
    return None


def model_from_checkpoint(ckpt: dict, use_ema: bool = True) -> torch.nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (the EMA weights if present)."""
    model = build(ckpt["model_name"], ckpt["model_options"], ckpt["num_classes"], tuple(ckpt["dataset"]["shape"]))
    state = ckpt["ema_state_dict"] if use_ema and ckpt.get("ema_state_dict") else ckpt["state_dict"]
    load_weights(model, state, ckpt["model_name"], source_changed(ckpt.get("model_source")))
    return model


def load_weights(model: torch.nn.Module, state: dict, name: str, changed: str | None = None) -> None:
    """``model.load_state_dict(state)`` with a one-line error when the weights do not fit. ``changed``:
    how the model's Python file differs from the one the weights were trained with (a warning on
    stderr if they still fit, part of the error if not)."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = str(e).splitlines()[0].rstrip(':. ')
        if changed:
            raise CnnlabError(f"{changed} and the checkpoint's weights no longer fit it ({detail}); restore the "
                              f"file the run was trained with, or train again") from None
        raise CnnlabError(f"checkpoint weights do not fit model {name} ({detail}); "
                          f"the checkpoint is from another model, or from an older cnnlab's version of it") from None
    if changed:
        print(f"warning: {changed}; its weights still fit, so the model is rebuilt from the file as it is now",
              file=sys.stderr)


def _git(*args: str) -> str | None:
    """stdout of a git command in cnnlab's own checkout, or None outside one (an installed copy)."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str | None:
    return _git("rev-parse", "HEAD") or None


def git_state() -> dict:
    """The commit of cnnlab's checkout and whether tracked files differ from it (None outside a checkout)."""
    commit = git_commit()
    changes = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(changes) if changes is not None else None}


def list_runs(root: Path) -> list[Path]:
    root = Path(root)
    if is_run(root):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and is_run(p)) if root.is_dir() else []
