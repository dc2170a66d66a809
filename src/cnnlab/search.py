"""Architecture and hyper-parameter search under a budget, on Optuna: ``cnnlab search SEARCH.toml``.

A search file is a base recipe (``recipe = "path"``, relative to the search file, and/or inline
recipe tables that override it), a ``[space]`` and a ``[search]`` table:

    recipe = "../recipes/mnist_8k.toml"
    [data]
    val_split = 5000                            # the objective is measured on these held-out images
    [search]
    objective = ["val_acc", "params"]           # or "val_acc"; "macs" may stand for "params"
    max_params = 8000                           # designs over budget are rejected before training
    epochs = 15
    pruner = "median"                           # or "hyperband", "none", or a table with settings
    [space]
    "model.width" = {float = [0.5, 1.25]}       # any recipe key, written as for --set
    "optim.lr" = {float = [0.02, 0.5], log = true}
    "data.batch_size" = {choice = [64, 128, 256]}
    c1 = {int = [4, 16]}                        # a placeholder: fills "{c1}" in any recipe string

Optuna does the searching (its samplers, pruners, RDB storage, heartbeats); this module only
translates: a trial's parameters become a recipe, the recipe becomes an ordinary run directory
``DIR/trial_0007`` (trained by ``train.train``), each epoch's validation accuracy goes to the
pruner. The study lives in ``--storage`` (default: ``DIR/study.db``, SQLite); ``DIR/trials.json``
is a snapshot of it (what ``cnnlab report DIR`` draws) and ``DIR/best_recipe.toml`` the best
trial's recipe, both rewritten after every trial.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import islice, product
from pathlib import Path

from cnnlab import config, evaluate, jsonfile, models, runs, train
from cnnlab.errors import CnnlabError
from cnnlab.summary import check_model, data_facts

OBJECTIVES = {"val_acc": "maximize", "params": "minimize", "macs": "minimize"}
SEARCH_KEYS = ("name", "objective", "target", "max_params", "max_macs", "epochs", "pruner", "sampler", "seed",
               "trials", "heartbeat")
SAMPLERS = ("tpe", "random", "nsga2")
PRUNERS = {"median": ("startup_trials", "warmup_epochs"), "hyperband": ("min_epochs", "reduction_factor"),
           "none": ()}
PLACEHOLDER = re.compile(r"\{(\w+)\}")
MAX_CORNERS = 64  # designs measured to find the smallest one in the space
MAX_REJECTED_IN_A_ROW = 200  # a worker stops when its sampler keeps proposing designs it must reject


@dataclass
class Dim:
    """One searched key: ``int``/``float`` in [low, high] (optionally log or stepped), or a ``choice``."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list = field(default_factory=list)

    def corners(self) -> list:
        return self.choices if self.kind == "choice" else [self.low, self.high]

    def describe(self) -> dict:
        if self.kind == "choice":
            return {"key": self.key, "choice": self.choices}
        return {"key": self.key, self.kind: [self.low, self.high], "log": self.log, "step": self.step}


@dataclass
class SearchSpec:
    name: str
    path: Path
    recipe: dict  # the base recipe's tables, --set applied, placeholders not yet filled
    space: list[Dim]
    objectives: list[str]
    max_params: int | None = None
    max_macs: int | None = None
    target: float | None = None
    pruner: dict = field(default_factory=dict)
    sampler: str = "tpe"
    seed: int | None = None
    trials: int = 20
    heartbeat: int = 30

    def identity(self) -> dict:
        """What makes a study this search: rerunning with the same identity continues it."""
        return {"recipe": self.recipe, "space": [d.describe() for d in self.space], "objectives": self.objectives,
                "max_params": self.max_params, "max_macs": self.max_macs}

    @property
    def epochs(self) -> int:
        """The most epochs a trial trains (the pruners' horizon)."""
        searched = [max(d.corners()) for d in self.space if d.key == "train.epochs"]
        return int(searched[0] if searched else self.recipe.get("train", {}).get("epochs", config.TrainConfig.epochs))

    @property
    def val_split(self) -> int:
        return int(self.recipe.get("data", {}).get("val_split", 0))


# ----------------------------------------------------------------------------- the search file


def load_search(path: str | Path, overrides: list[str] = ()) -> SearchSpec:
    """Read and check a search file: everything that can be wrong is found here, before any training."""
    path = Path(path)
    raw = config.read_toml(path, "search file", "searches/mnist_budget.toml")
    unknown = sorted(set(raw) - {"recipe", "search", "space", *config.SECTION_TYPES})
    if unknown:
        raise CnnlabError(f"{path}: unknown table or key {unknown[0]!r}; a search file has recipe = \"PATH\", "
                          f"recipe tables ({', '.join(config.SECTION_TYPES)}), [search] and [space]")
    for table in ("search", "space"):
        if not isinstance(raw.get(table, {}), dict):
            raise CnnlabError(f"{path}: '{table}' must be a table [{table}]")
    recipe = base_recipe(path, raw)
    opts = raw.get("search", {})
    bad = sorted(set(opts) - set(SEARCH_KEYS))
    if bad:
        raise CnnlabError(f"[search] {bad[0]}: unknown key; valid keys: {', '.join(SEARCH_KEYS)}")
    space = [parse_dim(k, v) for k, v in raw.get("space", {}).items()]
    if "epochs" in opts:
        if any(d.key == "train.epochs" for d in space):
            raise CnnlabError("[search] epochs and [space] train.epochs: set the epochs of every trial in one place")
        recipe.setdefault("train", {})["epochs"] = _positive_int("epochs", opts["epochs"])
    if not space:
        raise CnnlabError(f"{path}: [space] is empty; add a key to search, e.g. \"optim.lr\" = {{float = [0.01, 0.5], "
                          f"log = true}}")
    for item in overrides:
        check_override(item, space)
        config.apply_override(recipe, item)
    objectives = parse_objectives(opts.get("objective", "val_acc"))
    spec = SearchSpec(
        name=str(opts.get("name", path.stem)), path=path, recipe=recipe, space=space, objectives=objectives,
        max_params=_positive_int("max_params", opts["max_params"]) if "max_params" in opts else None,
        max_macs=_positive_int("max_macs", opts["max_macs"]) if "max_macs" in opts else None,
        target=parse_target(opts.get("target")), pruner=parse_pruner(opts.get("pruner"), objectives),
        sampler=parse_choice("sampler", opts.get("sampler", "tpe"), SAMPLERS),
        seed=_positive_int("seed", opts["seed"], 0) if "seed" in opts else None,
        trials=_positive_int("trials", opts.get("trials", 20)),
        heartbeat=_positive_int("heartbeat", opts.get("heartbeat", 30)))
    for key in ("max_params", "max_macs"):  # [model] max_params / max_macs of the recipe are budgets too
        limit, own = recipe.get("model", {}).get(key), getattr(spec, key)
        if isinstance(limit, int) and limit > 0 and (own is None or limit < own):
            setattr(spec, key, limit)
    check_spec(spec)
    return spec


def base_recipe(path: Path, raw: dict) -> dict:
    """The recipe file named by ``recipe`` (relative to the search file), then the inline tables over
    it; a model given as "file.py:function" is made absolute (from the file that names it)."""
    recipe, model_dir = {}, path.parent
    if "recipe" in raw:
        if not isinstance(raw["recipe"], str):
            raise CnnlabError(f"{path}: recipe = {raw['recipe']!r}: expected the path of a recipe, e.g. "
                              f"recipe = \"../recipes/mnist_8k.toml\"")
        recipe = config.read_toml(path.parent / raw["recipe"])
        model_dir = (path.parent / raw["recipe"]).parent
    for section in config.SECTION_TYPES:
        if section in raw:
            if not isinstance(raw[section], dict):
                raise CnnlabError(f"{path}: '{section}' must be a table [{section}]")
            recipe.setdefault(section, {}).update(raw[section])
    model = recipe.get("model", {})
    if isinstance(model.get("name"), str):
        model["name"] = config.resolve_reference(model["name"], path.parent if "name" in raw.get("model", {})
                                                 else model_dir)
    return recipe


def _positive_int(key: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CnnlabError(f"[search] {key} = {value!r}: expected a whole number >= {minimum}")
    return value


def parse_choice(key: str, value, valid) -> str:
    if value not in valid:
        raise CnnlabError(f"[search] {key} = {value!r}: expected one of {', '.join(valid)}")
    return value


def parse_target(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise CnnlabError(f"[search] target = {value!r}: a validation accuracy in (0, 1], e.g. 0.994")
    return float(value)


def parse_objectives(value) -> list[str]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise CnnlabError(f"[search] objective = {value!r}: expected \"val_acc\" or [\"val_acc\", \"params\"]")
    test = [n for n in names if "test" in n]
    if test:
        raise CnnlabError(f"[search] objective {test[0]!r}: a search selects on the validation split, never on the "
                          f"test set; use \"val_acc\" (data.val_split) and evaluate the best design once with --final")
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise CnnlabError(f"[search] objective {unknown[0]!r}: unknown; valid: {', '.join(OBJECTIVES)}")
    if names[0] != "val_acc" or len(names) > 2 or len(set(names)) != len(names):
        raise CnnlabError(f"[search] objective = {value!r}: expected \"val_acc\", or \"val_acc\" and one size "
                          f"(\"params\" or \"macs\") for a Pareto front")
    return names


def parse_pruner(value, objectives: list[str]) -> dict:
    """``pruner = "median"`` or ``pruner = {name = "median", startup_trials = 5, warmup_epochs = 0}``."""
    default = "median" if len(objectives) == 1 else "none"
    table = {"name": value if value is not None else default} if not isinstance(value, dict) else dict(value)
    name = parse_choice("pruner", table.get("name"), tuple(PRUNERS))
    bad = sorted(set(table) - {"name", *PRUNERS[name]})
    if bad:
        raise CnnlabError(f"[search] pruner {name}: unknown setting {bad[0]!r}; valid: "
                          f"{', '.join(PRUNERS[name]) or '(none)'}")
    for key, v in table.items():
        if key != "name":
            _positive_int(f"pruner.{key}", v, 0)
    if name != "none" and len(objectives) > 1:
        raise CnnlabError(f"[search] pruner = {name!r} with two objectives: Optuna prunes single-objective studies "
                          f"only; use pruner = \"none\", or objective = \"val_acc\" with max_params")
    return table


def parse_dim(key: str, value) -> Dim:
    """``{int = [lo, hi]}`` (``step``, ``log``), ``{float = [lo, hi]}`` (``log``, ``step``) or ``{choice = [...]}``."""
    where = f"[space] {key}"
    key = key.replace("model.options.", "model.", 1)
    if "." in key:
        table, _, name = key.partition(".")
        if table not in config.SECTION_TYPES or not name or "." in name:
            raise CnnlabError(f"{where}: unknown key; name a recipe key as table.key (tables: "
                              f"{', '.join(config.SECTION_TYPES)}), or a placeholder {{name}} used in a recipe string")
    elif not re.fullmatch(r"\w+", key):
        raise CnnlabError(f"{where}: a placeholder name must be letters, digits and _, e.g. c1")
    kinds = [k for k in ("int", "float", "choice") if isinstance(value, dict) and k in value]
    if len(kinds) != 1:
        raise CnnlabError(f"{where} = {value!r}: expected one of {{int = [4, 16]}}, {{float = [0.01, 0.5], "
                          f"log = true}} or {{choice = [64, 128]}}")
    kind = kinds[0]
    extra = sorted(set(value) - {kind, "log", "step"} if kind != "choice" else set(value) - {"choice"})
    if extra:
        raise CnnlabError(f"{where}: unknown setting {extra[0]!r} (an int or float range takes log and step)")
    if kind == "choice":
        choices = value["choice"]
        if not isinstance(choices, list) or not choices:
            raise CnnlabError(f"{where}: the choice is empty; list at least one value, e.g. {{choice = [64, 128]}}")
        plain = all(isinstance(c, (str, int, float, bool)) for c in choices)
        if not plain or len(set(map(repr, choices))) != len(choices):
            raise CnnlabError(f"{where}: choices must be distinct numbers, strings or booleans (for other values "
                              f"use placeholders in recipe strings)")
        return Dim(key, kind, choices=choices)
    bounds = value[kind]
    number = int if kind == "int" else (int, float)
    if (not isinstance(bounds, list) or len(bounds) != 2
            or not all(isinstance(b, number) and not isinstance(b, bool) for b in bounds)):
        raise CnnlabError(f"{where}: expected {kind} = [low, high] with two {'whole ' if kind == 'int' else ''}numbers")
    low, high = bounds
    if not low < high:
        raise CnnlabError(f"{where}: the range [{low}, {high}] is {'empty' if low == high else 'reversed'}; "
                          f"write [low, high] with low < high")
    log = value.get("log", False)
    if not isinstance(log, bool) or (log and low <= 0):
        raise CnnlabError(f"{where}: log = true needs a range above 0 (and log is true or false)")
    step = value.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, number) or step <= 0 or log):
        raise CnnlabError(f"{where}: step = {step!r}: expected a positive {kind} (and no log with a step)")
    return Dim(key, kind, low, high, log, step)


def check_override(item: str, space: list[Dim]) -> None:
    key = item.split("=", 1)[0].strip()
    for d in space:
        if key == d.key or (key == d.key.partition(".")[2] and "." in d.key):
            raise CnnlabError(f"--set {item}: {d.key} is searched in [space]; drop one of the two")


# ----------------------------------------------------------------------------- recipes of trials


def placeholders(value) -> set[str]:
    """Names of the ``{name}`` placeholders in the strings of a recipe (tables and lists included)."""
    if isinstance(value, str):
        return set(PLACEHOLDER.findall(value))
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return set().union(*(placeholders(v) for v in items))


def fill(value, params: dict):
    """The recipe with each ``{name}`` replaced: a string that is only ``"{name}"`` takes the value
    itself (a number stays a number); a list item that becomes "" is dropped (a block searched away)."""
    if isinstance(value, str):
        whole = PLACEHOLDER.fullmatch(value)
        if whole:
            return params[whole.group(1)]
        return PLACEHOLDER.sub(lambda m: str(params[m.group(1)]), value)
    if isinstance(value, dict):
        return {k: fill(v, params) for k, v in value.items()}
    if isinstance(value, list):
        return [v for v in (fill(x, params) for x in value) if v != ""]
    return value


def trial_recipe(spec: SearchSpec, params: dict) -> dict:
    """The raw recipe of one trial: the base recipe with the placeholders filled and the keys set."""
    recipe = fill(copy.deepcopy(spec.recipe), {k: v for k, v in params.items() if "." not in k})
    for key, value in params.items():
        if "." in key:
            table, _, name = key.partition(".")
            recipe.setdefault(table, {})[name] = value
    return recipe


def trial_config(spec: SearchSpec, params: dict) -> config.Config:
    return config.from_dict(trial_recipe(spec, params))


def measure(cfg: config.Config, facts: tuple) -> tuple[int, int]:
    """Parameters (Keras total) and MACs per image of a trial's model, built and checked (channels,
    output) but not trained; ``facts`` = ``summary.data_facts(cfg.data)``. The budget is ours to judge."""
    shape, classes, data = facts
    model = models.build(cfg.model.name, cfg.model.options, classes, shape)
    s = check_model(model, cfg.model.name, shape, classes, data)
    return s.total_params, s.macs


def over_budget(spec: SearchSpec, params: int, macs: int) -> str:
    """Why a design is over budget ("" when it fits)."""
    if spec.max_params is not None and params > spec.max_params:
        return f"{params:,} params > max_params {spec.max_params:,}"
    if spec.max_macs is not None and macs > spec.max_macs:
        return f"{macs:,} MACs > max_macs {spec.max_macs:,}"
    return ""


def fmt_params(params: dict) -> str:
    """``c1=8 optim.lr=0.05 extra="conv 16 p1"``: floats to 4 digits, strings with spaces quoted."""
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, str) and (v == "" or " " in v):
            return json.dumps(v)
        return str(v)

    return " ".join(f"{k}={fmt(v)}" for k, v in params.items())


def check_spec(spec: SearchSpec) -> None:
    """The space against the recipe: every placeholder defined and used, validation split set, every
    corner of the space a valid recipe and model, and some design within the budget."""
    used, defined = placeholders(spec.recipe), {d.key for d in spec.space if "." not in d.key}
    if used - defined:
        raise CnnlabError(f"the recipe uses {{{sorted(used - defined)[0]}}} but [space] does not define it; add e.g. "
                          f"{sorted(used - defined)[0]} = {{int = [4, 16]}}")
    if defined - used:
        raise CnnlabError(f"[space] {sorted(defined - used)[0]}: no recipe string uses "
                          f"{{{sorted(defined - used)[0]}}}; write it in one (e.g. \"conv {{c1}} k3\"), or name a "
                          f"recipe key as table.key")
    if spec.val_split <= 0:
        raise CnnlabError("the base recipe has no validation split (data.val_split = 0): a search selects on images "
                          "held out of the training set, never on the test set; set e.g. [data] val_split = 5000")
    lows = {d.key: d.corners()[0] for d in spec.space}
    highs = {d.key: d.corners()[-1] for d in spec.space}
    facts = None
    for corner in (lows, highs):
        try:
            cfg = trial_config(spec, corner)
            facts = facts or data_facts(cfg.data)
            measure(cfg, facts)
        except CnnlabError as e:
            raise CnnlabError(f"[space] at {fmt_params(corner)}: {e}") from None
    if spec.max_params is not None or spec.max_macs is not None:
        check_budget(spec, facts)


def check_budget(spec: SearchSpec, facts: tuple) -> None:
    """Refuse a budget no design in the space meets, naming the smallest design found: the model's
    ranges at their low ends (sizes grow with widths, depths and kernels) with every combination of
    its choices, up to ``MAX_CORNERS`` designs."""
    in_model = placeholders(spec.recipe.get("model", {}))
    dims = [d for d in spec.space if d.key.startswith("model.") or d.key in in_model]
    base = {d.key: d.corners()[0] for d in spec.space}
    sizes = []
    for values in islice(product(*(d.choices or [d.low] for d in dims)), MAX_CORNERS):
        design = dict(zip((d.key for d in dims), values))
        sizes.append((*measure(trial_config(spec, {**base, **design}), facts), design))
        if not over_budget(spec, *sizes[-1][:2]):
            return
    params, macs, design = min(sizes, key=lambda s: (s[0], s[1]))
    budget = ", ".join(f"{k} {v:,}" for k, v in (("max_params", spec.max_params), ("max_macs", spec.max_macs)) if v)
    raise CnnlabError(f"no design in the space meets the budget ({budget}): the smallest has {params:,} params and "
                      f"{macs:,} MACs ({fmt_params(design) or 'the base recipe'}); raise the budget or shrink the space")


# ----------------------------------------------------------------------------- storage and study


def optuna_module():
    try:
        import optuna
    except ImportError:
        raise CnnlabError("cnnlab search needs Optuna: pip install 'cnnlab[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the search prints its own line per trial
    return optuna


def default_storage(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


def storage_url(storage: str | None, out: Path) -> str:
    """--storage, else $CNNLAB_STORAGE (keeps a password out of the command line), else DIR/study.db."""
    return storage or os.environ.get("CNNLAB_STORAGE") or default_storage(out)


def masked(url: str) -> str:
    """The URL with its password replaced by ***."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def open_storage(url: str, heartbeat: int, log=print):
    """Optuna's RDB storage with heartbeats: a trial whose worker died (kill -9) is marked FAIL by the
    next worker that starts a trial, and its design is queued once more (a new trial number)."""
    optuna = optuna_module()
    import sqlalchemy.exc  # Optuna's own dependency

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)

    def stale(study, trial) -> None:
        log(f"trial {trial.number:>4}  failed: its worker stopped (killed?); its design is queued again")
        retry(study, trial)

    driver_url = re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", url)
    connect = {"timeout": 60} if url.startswith("sqlite") else {"connect_timeout": 10}
    password = re.search(r"://[^:/@]*:([^@/]*)@", url)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                driver_url, engine_kwargs={"connect_args": connect}, heartbeat_interval=heartbeat,
                heartbeat_stale_trial_callback=stale)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if password and password.group(1):
            reason = reason.replace(password.group(1), "***")
        raise CnnlabError(f"storage {masked(url)} is unreachable ({reason[:200]}); check the server, the URL and "
                          f"the driver (pip install 'cnnlab[search]')") from None


def open_study(spec: SearchSpec, storage, out: Path, url: str):
    """Create the study, or load it when it is this search (the same recipe, space, objectives and
    budget); a different study of that name, or a directory of another search, is refused."""
    optuna = optuna_module()
    identity = json.loads(json.dumps(spec.identity()))
    local = read_json(out / "search.json")
    if local is not None and (local.get("name") != spec.name or local.get("identity") != identity):
        raise CnnlabError(f"{out} holds a different search ({local.get('name')!r}, from {local.get('file')}); pass "
                          f"another --out, or the search file and --set it was started with")
    if spec.name in optuna.get_all_study_names(storage):
        study = optuna.load_study(study_name=spec.name, storage=storage)
        if study.user_attrs.get("cnnlab_search") != identity:
            raise CnnlabError(f"storage {masked(url)} holds a different study named {spec.name!r}; set [search] "
                              f"name to another name, or use the search file and --set it was started with")
        return study
    if local is not None:
        raise CnnlabError(f"{out}/search.json names study {spec.name!r}, which storage {masked(url)} does not hold; "
                          f"pass the --storage the search used, or another --out")
    study = optuna.create_study(storage=storage, study_name=spec.name, load_if_exists=True,
                                directions=[OBJECTIVES[o] for o in spec.objectives])
    study.set_user_attr("cnnlab_search", identity)
    return study


def make_sampler(spec: SearchSpec, seed: int | None):
    optuna = optuna_module()
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(spec: SearchSpec):
    optuna = optuna_module()
    p = spec.pruner
    if p["name"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.get("startup_trials", 5),
                                           n_warmup_steps=p.get("warmup_epochs", 0))
    if p["name"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, p.get("min_epochs", 1)), max_resource=spec.epochs,
                                              reduction_factor=max(2, p.get("reduction_factor", 3)))
    return optuna.pruners.NopPruner()


# ----------------------------------------------------------------------------- one trial


def suggest(trial, d: Dim):
    if d.kind == "choice":
        return trial.suggest_categorical(d.key, d.choices)
    if d.kind == "int":
        return trial.suggest_int(d.key, d.low, d.high, step=d.step or 1, log=d.log)
    return trial.suggest_float(d.key, d.low, d.high, step=d.step, log=d.log)


def run_trial(trial, spec: SearchSpec, out: Path, facts: tuple):
    """Optuna's objective: the trial's recipe, its size (over budget, or not a valid design: pruned
    before training, at no cost), then training into DIR/trial_NNNN with each epoch's validation
    accuracy sent to the pruner."""
    optuna = optuna_module()
    params = {d.key: suggest(trial, d) for d in spec.space}
    try:
        cfg = trial_config(spec, params)
        n_params, macs = measure(cfg, facts)
    except CnnlabError as e:  # e.g. a layer list whose maps shrink to nothing: a point to avoid, not bad input
        trial.set_user_attr("rejected", f"not a valid design: {e}")
        trial.set_constraint("valid", 1.0)
        raise optuna.TrialPruned(str(e)) from None
    cfg.train.quiet = True  # no per-epoch table or bar: the search prints a line per trial
    trial.set_user_attr("params", n_params)
    trial.set_user_attr("macs", macs)
    for key, limit, value in (("params", spec.max_params, n_params), ("macs", spec.max_macs, macs)):
        if limit is not None:
            trial.set_constraint(key, value - limit)  # lets the sampler learn where the budget lies
    reason = over_budget(spec, n_params, macs)
    if reason:
        trial.set_user_attr("rejected", reason)
        raise optuna.TrialPruned(reason)
    run_dir = out / f"trial_{trial.number:04d}"
    trial.set_user_attr("run", run_dir.name)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    prune = spec.pruner["name"] != "none"

    def on_epoch(row: dict) -> None:
        trial.set_user_attr("epochs", row["epoch"])
        if prune:
            trial.report(row[runs.acc_key("val")], row["epoch"])
            if trial.should_prune():
                raise train.StopRun("pruned")

    try:
        result = train.train(cfg, run_dir, on_epoch=on_epoch, log=lambda *a, **k: None).result
    except CnnlabError as e:  # a diverged design is a bad region, not bad input: the sampler learns from it
        if (read_json(run_dir / "result.json") or {}).get("status") != "diverged":
            raise
        trial.set_user_attr("diverged", str(e))
        trial.set_constraint("finite", 1.0)
        raise optuna.TrialPruned(str(e)) from None
    trial.set_user_attr("epochs", result["epochs_run"])
    trial.set_user_attr("seconds", result["train_seconds"])
    if result["status"] == "pruned":
        raise optuna.TrialPruned(f"pruned at epoch {result['epochs_run']}")
    acc = runs.final_acc(result)
    return acc if len(spec.objectives) == 1 else (acc, n_params if spec.objectives[1] == "params" else macs)


# ----------------------------------------------------------------------------- the study as data


def trial_record(t) -> dict:
    """One trial as plain data (for trials.json and the report)."""
    attrs = dict(t.user_attrs)
    state = "rejected" if "rejected" in attrs else "diverged" if "diverged" in attrs else t.state.name.lower()
    inter = t.intermediate_values
    return {"number": t.number, "state": state, "values": t.values, "params": t.params, "attrs": attrs,
            "val_acc": t.values[0] if t.values else (inter[max(inter)] if inter else None),
            "intermediate": {str(k): v for k, v in sorted(inter.items())},
            "start": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
            "complete": t.datetime_complete.isoformat(timespec="seconds") if t.datetime_complete else None}


def best_record(records: list[dict], target: float | None) -> dict | None:
    """The best finished trial: the fewest parameters among those reaching ``target`` validation
    accuracy, else (or without a target) the highest validation accuracy (fewer parameters on a tie)."""
    done = [r for r in records if r["state"] == "complete"]
    reached = [r for r in done if target is not None and r["val_acc"] >= target]
    if reached:
        return min(reached, key=lambda r: (r["attrs"]["params"], -r["val_acc"]))
    return max(done, key=lambda r: (r["val_acc"], -r["attrs"]["params"]), default=None)


def importances(study) -> dict:
    """Optuna's parameter importances (PED-ANOVA) over the finished trials; {} before two of them."""
    optuna = optuna_module()
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(done) < 2 or len({json.dumps(t.params, sort_keys=True) for t in done}) < 2:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "too few trials" notes: the numbers are shown as they are
        return dict(optuna.importance.get_param_importances(study))


def counts(records: list[dict]) -> dict:
    keys = ("complete", "pruned", "diverged", "rejected", "fail", "running", "waiting")
    return {k: sum(r["state"] == k for r in records) for k in keys}


def trained(records: list[dict]) -> int:
    """Trials that count toward --trials: trained to the end, pruned or diverged (not rejected
    before training, not failed by an interruption)."""
    c = counts(records)
    return c["complete"] + c["pruned"] + c["diverged"]


def snapshot(study, spec: SearchSpec, out: Path) -> dict:
    """Write DIR/trials.json (the study as data) and DIR/best_recipe.toml (the best trial's recipe)."""
    records = [trial_record(t) for t in study.get_trials(deepcopy=False)]
    best = best_record(records, spec.target)
    data = {"study": spec.name, "objectives": spec.objectives, "max_params": spec.max_params,
            "max_macs": spec.max_macs, "target": spec.target, "val_split": spec.val_split, "epochs": spec.epochs,
            "pruner": spec.pruner["name"], "sampler": spec.sampler, "space": [d.describe() for d in spec.space],
            "counts": counts(records), "best": best["number"] if best else None, "importances": importances(study),
            "updated": now(), "trials": records}
    runs.write_json(out / "trials.json", data)
    if best is not None:
        header = (f"# best trial {best['number']} of search {spec.name!r}: validation accuracy {best['val_acc']:.2%} "
                  f"on {spec.val_split:,} images held out of the training set, {best['attrs']['params']:,} params\n"
                  f"# {fmt_params(best['params'])}\n# reproduce: cnnlab train {out / 'best_recipe.toml'}\n")
        runs.write_text(out / "best_recipe.toml", header + config.to_toml(trial_config(spec, best["params"])))
    return data


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return jsonfile.read_object(path, "delete it (the study itself is in the storage)")


def trial_line(r: dict, done: int, total: int) -> str:
    """The progress line of a finished trial."""
    a, head = r["attrs"], f"trial {r['number']:>4}"
    size = f"{a['params']:,} params" if "params" in a else ""
    design = f"[{fmt_params(r['params'])}]"
    if r["state"] == "rejected":
        return f"{head}  rejected before training: {a['rejected']}  {design}"
    if r["state"] == "fail":
        return f"{head}  failed (interrupted or killed)  {design}"
    if r["state"] == "diverged":
        return f"{head}  diverged: {a['diverged'].split(':')[0]}  {design}  ({done}/{total})"
    acc = f"val {r['val_acc']:.2%}" if r["val_acc"] is not None else "val n/a"
    what = "done" if r["state"] == "complete" else f"pruned at epoch {a.get('epochs', '?')}"
    return (f"{head}  {what:<18} {acc}  {size}  {a.get('epochs', '?')} epochs  {a.get('seconds', 0):.1f} s  "
            f"{design}  ({done}/{total})")


# ----------------------------------------------------------------------------- running a search


def run_worker(spec: SearchSpec, storage, out: Path, trials: int, timeout: float | None, seed: int | None,
               log=print, prefix: str = "") -> None:
    """One worker: trials until the study holds ``trials`` trained ones (all workers together) or
    ``timeout`` seconds have passed."""
    optuna = optuna_module()
    study = optuna.load_study(study_name=spec.name, storage=storage, sampler=make_sampler(spec, seed),
                              pruner=make_pruner(spec))
    facts = data_facts(trial_config(spec, {d.key: d.corners()[0] for d in spec.space}).data)
    rejected_in_a_row = [0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a killed worker's trial is not "running" any more
    left = remaining(study, trials)
    if left <= 0:
        return
    bar = trials_bar(trials, trials - left, enabled=not prefix)

    def after_trial(study, frozen) -> None:
        records = snapshot(study, spec, out)["trials"]
        done = trained(records)
        r = next(x for x in records if x["number"] == frozen.number)
        (bar.write if bar else log)(prefix + trial_line(r, done, trials))
        if bar:
            bar.update(done - bar.n)
        rejected_in_a_row[0] = rejected_in_a_row[0] + 1 if r["state"] == "rejected" else 0
        if rejected_in_a_row[0] >= MAX_REJECTED_IN_A_ROW:
            log(f"{prefix}stopping: {MAX_REJECTED_IN_A_ROW} designs in a row were rejected (over budget or not a "
                f"valid network); shrink the space")
            study.stop()
        if done + counts(records)["running"] >= trials:
            study.stop()

    try:
        study.optimize(lambda t: run_trial(t, spec, out, facts), timeout=timeout, callbacks=[after_trial],
                       gc_after_trial=False)
    finally:
        if bar:
            bar.close()


def trials_bar(trials: int, done: int, enabled: bool):
    """An overall bar of trained trials on a terminal (one worker; none in CI or a log file)."""
    if not enabled or not sys.stderr.isatty() or os.environ.get("CI"):
        return None
    from tqdm import tqdm

    return tqdm(total=trials, initial=done, desc="trials", unit="trial", dynamic_ncols=True)


def remaining(study, trials: int) -> int:
    records = [trial_record(t) for t in study.get_trials(deepcopy=False)]
    return trials - trained(records) - counts(records)["running"]


def worker_command(path: Path, out: Path, trials: int, timeout: float | None, overrides: list[str],
                   index: int) -> list[str]:
    cmd = [sys.executable, "-m", "cnnlab.cli", "search", str(path), "--out", str(out), "--trials", str(trials),
           "--worker-index", str(index)]
    cmd += ["--timeout", str(timeout)] if timeout is not None else []
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def spawn_workers(spec: SearchSpec, url: str, out: Path, trials: int, timeout: float | None,
                  overrides: list[str], workers: int) -> None:
    """``workers`` processes of the same command (``--workers 1``) that join the study; the storage URL
    goes through the environment, so a password never shows in a process list."""
    import cnnlab

    src = str(Path(cnnlab.__file__).resolve().parent.parent)
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    env = {**os.environ, "CNNLAB_STORAGE": url, "PYTHONPATH": os.pathsep.join(
        p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    env.setdefault("OMP_NUM_THREADS", threads)  # train.threads = 0 (torch's default): share the cores
    procs = [subprocess.Popen(worker_command(spec.path, out, trials, timeout, overrides, i), env=env)
             for i in range(1, workers + 1)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()  # SIGTERM: each worker ends its trial as Ctrl-C does (marked FAIL)
        for p in procs:
            p.wait()
        raise
    if any(c == 130 for c in codes):
        raise KeyboardInterrupt
    bad = [(i, c) for i, c in enumerate(codes, 1) if c]
    if bad:
        raise CnnlabError(f"worker {bad[0][0]} exited with code {bad[0][1]} (its message is above); the study "
                          f"keeps every finished trial: rerun the same command to continue")


def run_search(path: str | Path, out: str | Path | None = None, trials: int | None = None,
               timeout: float | None = None, workers: int = 1, storage: str | None = None,
               overrides: list[str] = (), final: bool = False, worker_index: int = 0, log=print) -> dict:
    """Run (or continue) a search; return the snapshot of its study (``trials.json``)."""
    spec = load_search(path, list(overrides))
    out = Path(out or f"runs/search_{spec.name}")
    trials = trials if trials is not None else spec.trials
    if trials < 1 or workers < 1 or (timeout is not None and timeout <= 0):
        raise CnnlabError(f"--trials {trials}, --workers {workers}, --timeout {timeout}: expected positive numbers")
    url = storage_url(storage, out)
    if url == default_storage(out):
        out.mkdir(parents=True, exist_ok=True)  # the SQLite file's folder
    store = open_storage(url, spec.heartbeat, log)
    study = open_study(spec, store, out, url)
    out.mkdir(parents=True, exist_ok=True)
    if worker_index:  # a process started by --workers: trials only
        seed = None if spec.seed is None else spec.seed + 1000 * worker_index + len(study.trials)
        run_worker(spec, store, out, trials, timeout, seed, log, prefix=f"[worker {worker_index}] ")
        return snapshot(study, spec, out)
    runs.write_json(out / "search.json", {"name": spec.name, "file": str(spec.path), "overrides": list(overrides),
                                          "storage": masked(url), "identity": spec.identity(), "started": now()})
    left = remaining(study, trials)
    log(f"search {spec.name!r}: {len(spec.space)} keys, objective {' + '.join(spec.objectives)} on "
        f"{spec.val_split:,} validation images, {spec.epochs} epochs per trial, pruner {spec.pruner['name']}; "
        f"storage {masked(url)}; {trials - left} of {trials} trials done"
        + (f", {workers} workers" if workers > 1 else ""))
    if left > 0 and workers > 1:
        spawn_workers(spec, url, out, trials, timeout, list(overrides), workers)
    elif left > 0:
        seed = None if spec.seed is None else spec.seed + len(study.trials)
        run_worker(spec, store, out, trials, timeout, seed, log)
    data = snapshot(study, spec, out)
    log(summary_line(data, out))
    if final:
        data["final"] = final_test(data, out, log)
    return data


def summary_line(data: dict, out: Path) -> str:
    c = data["counts"]
    head = (f"{c['complete']} trained, {c['pruned']} pruned, {c['diverged']} diverged, {c['rejected']} rejected "
            f"before training, {c['fail']} failed")
    best = next((r for r in data["trials"] if r["number"] == data["best"]), None)
    if best is None:
        return f"{head}; no finished trial yet"
    return (f"{head}; best: trial {best['number']}, validation accuracy {best['val_acc']:.2%}, "
            f"{best['attrs']['params']:,} params; recipe: {out / 'best_recipe.toml'}")


def final_test(data: dict, out: Path, log=print) -> dict:
    """Evaluate the best trial's final weights (last.pt) once on the test set: DIR/final/eval.json."""
    best = next((r for r in data["trials"] if r["number"] == data["best"]), None)
    if best is None:
        raise CnnlabError("--final: no trial has finished yet, so there is no best design to test")
    run_dir = out / best["attrs"]["run"]
    if not (run_dir / "last.pt").is_file():
        raise CnnlabError(f"--final: the best trial ran elsewhere ({best['attrs'].get('worker')}); run --final "
                          f"there, or retrain its recipe: cnnlab train {out / 'best_recipe.toml'}")
    ev = evaluate.evaluate_run(run_dir, "last", split="test", out_dir=out / "final")
    log(f"final: trial {best['number']} ({run_dir.name}/last.pt) on the test set, evaluated once: {ev['accuracy']:.2%} "
        f"on {ev['n']:,} images (validation {best['val_acc']:.2%}); {out / 'final' / 'eval.json'}")
    return ev
