"""Training recipes side by side at equal epochs on the shared CIFAR-10 subset: one training run per recipe, measured
on its trained weights and, where the recipe keeps one, on their average.

    python experiments/recipes.py [--rows fgsm_rs nfgsm ...] [--epochs 15] [--threads 2] [--device cpu|cuda]
        [--no-cifar-stem] [--aa-images 200] [--out runs/recipes/results.jsonl]

Every recipe trains a ResNet18 from ``configs/imagefolder.yaml`` (the real CIFAR-10 subset: ~5,000 training and
~1,000 test images at 32×32, batch 128, one-cycle SGD to 0.1) in this process through ``train.main(args,
run=False)``, the same seed for all, then measures the ``last.ckpt`` it wrote. Recipes (:data:`RECIPES`), at eps
8/255 unless named ``_eps16``:

- ``fgsm_rs``: FGSM with random start, step 1.25·eps = 10/255 (Wong et al. 2020, "Fast is better than free").
- ``nfgsm``: N-FGSM, noise U(-2·eps, 2·eps), step eps, no projection (de Jorge et al. 2022, ``pdejorge/N-FGSM``).
- ``pgd3``: PGD-3 AT (Madry et al. 2018 with 3 steps), uniform random start, step 2/255 = eps/4: the step of the
  PGD-AT baselines at 8/255 in Wong et al. 2020 (PGD-7) and Rice et al. 2020 (``locuslab/robust_overfitting``,
  PGD-10, ``--pgd-alpha 2``), kept as the steps are cut to 3.
- ``trades``: TRADES, beta 6, PGD-10 on its KL with step 0.007/0.031·eps (Zhang et al. 2019,
  ``yaodongyu/TRADES`` train_trades_cifar10.py); ``mart``: MART, beta 5, PGD-10 on CE, same step (Wang et al.
  2020, ``YisenWang/MART`` train_resnet.py), at that script's peak lr 0.01 and weight decay 3.5e-3 (at the shared
  lr 0.1 its loss went to NaN within the first epoch).
- ``finetune``: clean pretraining for ``--pretrain-epochs`` (default a third), then FGSM-RS fine-tuning from its
  ``last.ckpt`` for the remaining epochs with ``configs/imagefolder_finetune.yaml`` (``--model.weights``, backbone
  at a tenth of the head's learning rate): the same total epochs as ``fgsm_rs`` from scratch.
- ``fgsm_rs_eps16``, ``nfgsm_eps16``: the large-eps pair at 16/255 (step 20/255 and 16/255), where FGSM-RS is known
  to collapse and N-FGSM held in de Jorge et al. 2022.

Rows: every recipe but the eps-16 pair (which are about collapse; see ``Recipe.ema``) trains with an EMA of the
weights (``--ema.decay``, see :func:`ema_decay`; of the adversarial stage for ``finetune``) and gives two rows from
that one run: ``X``, its trained weights (``ema_decay`` null), and ``X_ema``, their average (``ema_decay`` the
decay). The pair costs one training: nothing feeds the average back into training (no validation, and the guard
probes the trained weights with its own seeded, restored RNG), so the trained weights follow the very trajectory of
a run without EMA (tests/test_experiments_recipes.py checks it bit for bit). Both are read from the run's
``last.ckpt``: the average is its ``state_dict``, the trained weights its ``current_model_state``
(:func:`trained_checkpoint`). The eps-16 pair train with ``--ema.decay null`` (imagefolder.yaml turns it on): one
row each.

Every adversarial stage runs the catastrophic-overfitting guard in ``warn`` mode, forced on for every attack: no run
is stopped or rolled back (equal epochs), every run pays the same probe (PGD-10 on 128 training images at the
start and at each epoch's end, on the trained weights, not the average), and every run records its ``guard/pgd``
trajectory (in both its rows). Validation is off (``limit_val_batches 0``): the test images pick no
checkpoint.

Measured per row on the held-out test split (``val_dir`` of the config) at the row's eps, by
:func:`robust.threats.accuracy`: clean and PGD-10 accuracy (step eps/4, random start, seeded) on all test images
(``--test-images`` to cut them), and torchattacks' standard AutoAttack on ``--aa-images`` evenly spaced test images
(with clean and PGD-10 on those same images, to compare like with like; 0: skip AutoAttack).

Output: the machine line, then ``ROW {json}`` per row as soon as its run's rows are measured (keys:
:data:`ROW_KEYS`; the training fields, ``checkpoint`` included, are the run's and the same in ``X`` and ``X_ema``;
``guard_pgd[0]`` is the check before the first step, ``guard_pgd[k]`` after epoch k, of the fine-tuning stage for
``finetune``; ``guard_flagged`` lists the k flagged as a collapse; ``train_s`` includes the probe's ``probe_s``;
``steps`` counts optimizer steps), then a Markdown table. ``--out FILE`` appends each row to FILE (JSON lines) and
skips the recipes whose rows FILE already holds, all of them, for the same setup (:meth:`Setup.key`), so a long
comparison continues after a stop.

Cost: one training run per recipe (its two rows share it: the EMA costs one weight update per step), whose steps
each cost about (passes per image) forward-backward passes of the batch: 1 clean, 2 for FGSM-RS and N-FGSM, 4 for
PGD-3, about 12 for TRADES and MART (10 attack steps); evaluation, per row (twice for an EMA recipe), adds PGD-10 on
the test images (11 passes each) and AutoAttack, which on a robust model spends thousands of passes on each image it
cannot break (APGD-T and FAB-T over 9 target classes, Square's 5,000 queries). On 2 CPU cores the full default
comparison takes days; ``--no-cifar-stem`` (~6× faster there), fewer ``--aa-images`` and ``--rows`` in parts with
``--out`` cut it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from experiments.common import fmt, limit_args, machine  # noqa: E402
from robust.cli import exit_code  # noqa: E402
from robust.cli_defaults import pick_device  # noqa: E402
from robust.data.eval_data import eval_data  # noqa: E402
from robust.data.modules import ImageFolder  # noqa: E402
from robust.errors import RobustError  # noqa: E402
from robust.files import load_checkpoint  # noqa: E402
from robust.models.build import CardedModel, card_of  # noqa: E402
from robust.models.resolve import CARD_KEY, model_from_ckpt  # noqa: E402
from robust.objectives import check_objective  # noqa: E402
from robust.threats import ThreatSpec, accuracy  # noqa: E402
from robust.training.averaging import EMA_DECAY_KEY  # noqa: E402
from robust.training.guard import CatastrophicOverfittingGuard  # noqa: E402
from robust.training.module import AdversarialClassifier  # noqa: E402
from robust.training.runfiles import shared_data_dir  # noqa: E402

CONFIG = ROOT / "configs" / "imagefolder.yaml"
FINETUNE_CONFIG = ROOT / "configs" / "imagefolder_finetune.yaml"
FAST_CONFIG = ROOT / "configs" / "cifar10_fast.yaml"  # the GPU settings taken on --device cuda
EPS, LARGE_EPS = 8 / 255, 16 / 255
PGD_STEPS = 10  # the evaluation attack: PGD-10, step eps/4 (robust.attacks.ATTACKS), random start
PREVIOUS_CKPT = "<last.ckpt of the previous stage>"  # replaced when the previous stage has written it
ROW_KEYS = (
    "name",
    "recipe",
    "attack",
    "objective",
    "eps",
    "alpha",
    "attack_steps",
    "ema_decay",
    "epochs",
    "steps",
    "clean",
    "pgd10",
    "n_test",
    "autoattack",
    "aa_clean",
    "aa_pgd10",
    "n_aa",
    "train_s",
    "probe_s",
    "eval_s",
    "aa_s",
    "guard_pgd",
    "guard_fgsm",
    "guard_flagged",
    "checkpoint",
    "stages",
    "setup",
    "device",
    "threads",
    "machine",
    "date",
)


@dataclass(frozen=True)
class Recipe:
    """One training run: ``attack`` and ``objective`` at ``eps`` (pixel units), PGD ``attack_steps`` (None: the
    objective's official count), from scratch or after clean pretraining; with ``ema``, it also keeps an EMA of the
    weights, measured as a second row (:attr:`row_names`); ``train_args``: its own train.py settings where its
    paper's training script differs from the shared config in a way the recipe needs."""

    name: str
    label: str
    attack: str
    objective: str = "ce"
    eps: float = EPS
    attack_steps: int | None = None
    ema: bool = True
    pretrain: bool = False
    train_args: tuple[str, ...] = ()

    @property
    def row_names(self) -> tuple[str, ...]:
        """Its rows: the trained weights, then (with ``ema``) their average."""
        return (self.name, f"{self.name}_ema") if self.ema else (self.name,)

    @property
    def alpha(self) -> float:
        """The training step: the module's default for this attack and objective (the papers' steps)."""
        return AdversarialClassifier.default_alpha(self.attack, self.objective, self.eps)

    @property
    def steps(self) -> int | None:
        """PGD iterations of the training attack; None for one-step attacks."""
        if self.attack != "pgd":
            return None
        return self.attack_steps or check_objective(self.objective, self.attack).steps


RECIPES = (
    Recipe("fgsm_rs", "FGSM-RS", "fgsm_rs"),
    Recipe("nfgsm", "N-FGSM", "nfgsm"),
    Recipe("pgd3", "PGD-3 AT", "pgd", attack_steps=3),
    Recipe("trades", "TRADES", "pgd", "trades"),
    # MART at the shared peak lr 0.1 went to NaN within its first epoch; train_resnet.py's lr 0.01, wd 3.5e-3
    Recipe(
        "mart",
        "MART",
        "pgd",
        "mart",
        train_args=("--model.optimizer.lr", "0.01", "--model.optimizer.weight_decay", "0.0035"),
    ),
    Recipe("finetune", "clean → FGSM-RS fine-tune", "fgsm_rs", pretrain=True),
    Recipe("fgsm_rs_eps16", "FGSM-RS", "fgsm_rs", eps=LARGE_EPS, ema=False),
    Recipe("nfgsm_eps16", "N-FGSM", "nfgsm", eps=LARGE_EPS, ema=False),
)
BY_NAME = {r.name: r for r in RECIPES}
ROW_NAMES = {name for r in RECIPES for name in r.row_names}


@dataclass(frozen=True)
class Setup:
    """What every run shares: data ``root`` (an ImageFolder tree), total ``epochs`` (``pretrain_epochs`` of them clean
    for ``finetune``), optimizer ``steps_per_epoch`` (for the EMA decay), ``device`` type, the CIFAR stem (None: the
    config's), batch size (None: the config's), a limit of training batches per epoch (smoke tests), ``seed``, extra
    ``train_args`` appended to every stage, the evaluation's image counts (``test_images`` None: all), and
    ``logs``, where the runs' TensorBoard logs and checkpoints go."""

    root: str
    epochs: int = 15
    pretrain_epochs: int = 5
    steps_per_epoch: int = 41
    device: str = "cpu"
    cifar_stem: bool | None = None
    batch_size: int | None = None
    limit_train_batches: int | None = None
    seed: int = 0
    train_args: tuple[str, ...] = ()
    test_images: int | None = None
    aa_images: int = 200
    logs: str = "runs/recipes"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.steps_per_epoch < 1:
            raise RobustError(
                f"epochs and steps per epoch must be at least 1, got {self.epochs} and {self.steps_per_epoch}"
            )
        counts = (self.test_images, self.batch_size, self.limit_train_batches)
        if self.aa_images < 0 or any(n is not None and n < 1 for n in counts):
            raise RobustError(
                "--aa-images must be 0 or more; --test-images, --batch-size and --limit-train-batches at least 1"
            )

    def key(self) -> dict:
        """What a row saved by an earlier run must share with this run to stand for it (all but ``logs``), as JSON."""
        return json.loads(json.dumps({k: v for k, v in asdict(self).items() if k != "logs"}))


@dataclass(frozen=True)
class Stage:
    """One ``train.py fit`` run of a recipe: its TensorBoard name and argument list (without ``fit``)."""

    name: str
    args: list[str]


def ema_decay(steps: int) -> float:
    """The EMA decay for a run of ``steps`` optimizer steps: the average's horizon ``1/(1 - decay)`` is a sixth of
    the run (0.99 for the subset's 615 steps in 15 epochs, as in imagefolder.yaml), so the first step's weight in
    it, ``decay**(steps - 1)``, is about e^-6, far below the 5% at which WeightEMA warns; at most 0.999, at least
    0.5 (runs under 12 steps, smoke tests only)."""
    return round(min(0.999, max(0.5, 1 - 6 / steps)), 4)


def decay_of(recipe: Recipe, setup: Setup) -> float | None:
    """The EMA decay of ``recipe``'s adversarial stage (:func:`ema_decay` of its steps); None without EMA."""
    if not recipe.ema:
        return None
    epochs = setup.epochs - setup.pretrain_epochs if recipe.pretrain else setup.epochs
    return ema_decay(epochs * setup.steps_per_epoch)


def _common(setup: Setup, name: str, epochs: int) -> list[str]:
    args = [
        "--data.init_args.root",
        setup.root,
        "--seed_everything",
        str(setup.seed),
        "--trainer.max_epochs",
        str(epochs),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.logger.init_args.save_dir",
        setup.logs,
        "--trainer.logger.init_args.name",
        name,
    ]
    if setup.cifar_stem is not None:
        args += ["--model.cifar_stem", str(setup.cifar_stem).lower()]
    if setup.batch_size is not None:
        args += ["--data.init_args.batch_size", str(setup.batch_size)]
    return args + limit_args(setup.limit_train_batches) + device_args(setup.device)


def device_args(device: str) -> list[str]:
    """Trainer settings for ``device`` (``cpu`` or ``cuda``); on cuda, the fast path of configs/cifar10_fast.yaml:
    its precision (bf16 autocast), channels-last and loader workers. Batch size and learning rate stay the
    subset config's, so the CPU and GPU tables compare."""
    if device != "cuda":
        return ["--trainer.accelerator", "cpu"]
    fast = yaml.safe_load(FAST_CONFIG.read_text())
    return [
        "--trainer.accelerator",
        "gpu",
        "--trainer.precision",
        str(fast["trainer"]["precision"]),
        "--model.channels_last",
        str(fast["model"]["channels_last"]).lower(),
        "--data.init_args.num_workers",
        str(fast["data"]["init_args"]["num_workers"]),
    ]


def _adversarial(recipe: Recipe, setup: Setup) -> list[str]:
    args = [
        "--model.attack",
        recipe.attack,
        "--model.objective",
        recipe.objective,
        "--model.eps",
        repr(recipe.eps),
        "--model.alpha",
        repr(recipe.alpha),
    ]
    if recipe.steps is not None:
        args += ["--model.attack_steps", str(recipe.steps)]
    if recipe.attack == "nfgsm":
        args += ["--model.nfgsm_noise", "2"]
    decay = decay_of(recipe, setup)
    return args + [
        "--ema.decay",
        "null" if decay is None else repr(decay),
        "--ema.adapt",
        "false",  # the decay of ema_decay: a sixth of the run, whatever WeightEMA would adapt it to
        "--overfit_guard.action",
        "warn",
        "--overfit_guard.on_collapse",
        "shrink_step",
        "--overfit_guard.force",
        "true",
        *recipe.train_args,
    ]


def stages(recipe: Recipe, setup: Setup) -> list[Stage]:
    """The ``train.py fit`` runs of ``recipe`` under ``setup``, in order (a later stage's :data:`PREVIOUS_CKPT` is
    the ``last.ckpt`` of the stage before it)."""
    extra = list(setup.train_args)
    if not recipe.pretrain:
        args = ["--config", str(CONFIG), *_common(setup, recipe.name, setup.epochs)]
        return [Stage(recipe.name, args + _adversarial(recipe, setup) + extra)]
    pre, tune = setup.pretrain_epochs, setup.epochs - setup.pretrain_epochs
    if pre < 1 or tune < 1:
        raise RobustError(
            f"{recipe.name}: --pretrain-epochs must be at least 1 and below --epochs ({setup.epochs}) "
            f"to leave epochs to fine-tune, got {pre}"
        )
    clean = [
        "--config",
        str(CONFIG),
        *_common(setup, f"{recipe.name}_pretrain", pre),
        "--model.attack",
        "none",
        "--ema.decay",
        "null",
    ]
    adversarial = [
        "--config",
        str(FINETUNE_CONFIG),
        *_common(setup, recipe.name, tune),
        "--model.weights",
        PREVIOUS_CKPT,
        *_adversarial(recipe, setup),
    ]
    return [Stage(f"{recipe.name}_pretrain", clean + extra), Stage(recipe.name, adversarial + extra)]


# ---- running and measuring ---------------------------------------------------------------------


def _timed(fn: Callable, clock: list[float]) -> Callable:
    """``fn``, adding the seconds each call takes to ``clock[0]``."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[0] += time.perf_counter() - start

    return wrapper


def train_recipe(recipe: Recipe, setup: Setup) -> dict:
    """Run the stages of ``recipe``; what was trained and how long it took, and the last ``last.ckpt``."""
    out = {"epochs": 0, "steps": 0, "train_s": 0.0, "probe_s": 0.0, "stages": []}
    last, history = None, []
    for stage in stages(recipe, setup):
        args = [last if a == PREVIOUS_CKPT else a for a in stage.args]
        cli = train.main(args, run=False)
        guard = next(cb for cb in cli.trainer.callbacks if isinstance(cb, CatastrophicOverfittingGuard))
        probe = [0.0]
        guard.check = _timed(guard.check, probe)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        out["train_s"] += time.perf_counter() - start
        out["probe_s"] += probe[0]
        out["epochs"] += cli.trainer.current_epoch
        out["steps"] += cli.trainer.global_step
        out["stages"].append(args)
        last = next(cb for cb in cli.trainer.checkpoint_callbacks if cb.monitor is None).best_model_path
        history = guard.history or history
        test_dir = cli.datamodule.root / cli.datamodule.val_dir
    out.update(
        checkpoint=last,
        test_dir=str(test_dir),
        guard_pgd=[round(h["guard/pgd"], 4) for h in history],
        guard_fgsm=[round(h["guard/fgsm"], 4) for h in history],
        guard_flagged=[k for k, h in enumerate(history) if h["guard/collapsed"]],
    )
    return out


def _images(test_dir: str, model: torch.nn.Module, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``limit`` evenly spaced test images (all: None) as the model sees them, and their labels."""
    loader, _ = eval_data(test_dir, card_of(model), limit=limit)
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def trained_checkpoint(ckpt: dict) -> dict:
    """An EMA run's loaded checkpoint dict as the same run without EMA would have written it: the trained weights
    (Lightning's ``current_model_state``) as its ``state_dict``, no average keys, the card's ``ema_decay`` null."""
    if "current_model_state" not in ckpt:
        raise RobustError("the checkpoint holds no trained weights besides its state_dict: it was not trained with EMA")
    card = ckpt[CARD_KEY]
    rest = {k: v for k, v in ckpt.items() if k not in ("current_model_state", "averaging_state", EMA_DECAY_KEY)}
    return {
        **rest,
        "state_dict": ckpt["current_model_state"],
        CARD_KEY: {**card, "training": {**card["training"], "ema_decay": None}},
    }


def measure(model: CardedModel, test_dir: str, eps: float, setup: Setup, device: torch.device) -> dict:
    """Clean and PGD-10 accuracy on the test images, AutoAttack (with clean and PGD-10) on ``setup.aa_images`` of
    them, at ``eps``; seconds of each part."""
    model = model.to(device).eval()
    start = time.perf_counter()
    x, y = _images(test_dir, model, setup.test_images)
    acc = accuracy(model, x, y, ThreatSpec(eps, steps=PGD_STEPS, threats=("clean", "pgd")))
    out = {"clean": acc["clean"], "pgd10": acc["pgd"], "n_test": len(y), "eval_s": time.perf_counter() - start}
    out.update(autoattack=None, aa_clean=None, aa_pgd10=None, n_aa=0, aa_s=0.0)
    if setup.aa_images:
        start = time.perf_counter()
        x, y = _images(test_dir, model, setup.aa_images)
        acc = accuracy(model, x, y, ThreatSpec(eps, steps=PGD_STEPS, threats=("clean", "pgd", "autoattack")))
        out.update(
            autoattack=acc["autoattack"],
            aa_clean=acc["clean"],
            aa_pgd10=acc["pgd"],
            n_aa=len(y),
            aa_s=time.perf_counter() - start,
        )
        out["eval_s"] += out["aa_s"]
    return out


def run_recipe(recipe: Recipe, setup: Setup, device: torch.device) -> list[dict]:
    """Train ``recipe`` once and measure its trained weights and, with EMA, their average: its rows (named
    :attr:`Recipe.row_names`, keys :data:`ROW_KEYS`)."""
    trained = train_recipe(recipe, setup)
    test_dir = trained.pop("test_dir")
    ckpt = load_checkpoint(trained["checkpoint"])
    decay = decay_of(recipe, setup)
    weights = [(None, ckpt)] if decay is None else [(None, trained_checkpoint(ckpt)), (decay, ckpt)]
    rows = []
    for name, (row_decay, state) in zip(recipe.row_names, weights, strict=True):
        model = model_from_ckpt(state, f"{trained['checkpoint']} ({'average' if row_decay else 'trained weights'})")
        row = {
            "name": name,
            "recipe": recipe.label,
            "attack": recipe.attack,
            "objective": recipe.objective,
            "eps": recipe.eps,
            "alpha": recipe.alpha,
            "attack_steps": recipe.steps,
            "ema_decay": row_decay,
            **trained,
            **measure(model, test_dir, recipe.eps, setup, device),
            "setup": setup.key(),
            "device": device.type,
            "threads": torch.get_num_threads(),
            "machine": machine(device),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        for key in ("train_s", "probe_s", "eval_s", "aa_s"):
            row[key] = round(row[key], 1)
        rows.append({k: row[k] for k in ROW_KEYS})
    return rows


# ---- results file and table --------------------------------------------------------------------


def saved_rows(path: Path | None, setup: Setup) -> dict[str, dict]:
    """The rows in the JSON-lines file ``path`` measured under this ``setup`` (:meth:`Setup.key`), by name (the last
    of each name wins); lines that do not parse (a write cut short by a stop) are passed over."""
    if path is None or not path.exists():
        return {}
    rows, key = {}, setup.key()
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("setup") == key and row.get("name") in ROW_NAMES:
            rows[row["name"]] = row
    return rows


def finished(recipe: Recipe, saved: dict[str, dict]) -> list[dict] | None:
    """``recipe``'s rows among the ``saved`` ones (:func:`saved_rows`), or None unless all of them are there (its run
    gives them all at once: one missing means the run is redone)."""
    if not all(name in saved for name in recipe.row_names):
        return None
    return [saved[name] for name in recipe.row_names]


def append_row(path: Path, row: dict) -> None:
    """Append ``row`` to the JSON-lines file ``path`` as one line, flushed to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def _eps_label(eps: float) -> str:
    return f"{round(eps * 255)}/255"


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (accuracies in [0, 1], times in minutes), then each run's guard trajectory."""
    lines = [
        "| row | recipe | ε | EMA | epochs | steps | clean | PGD-10 | AA images: clean / PGD-10 / AutoAttack "
        "| train min (probe) | eval min (AA) |",
        "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        aa = f"{fmt(r['aa_clean'])} / {fmt(r['aa_pgd10'])} / **{fmt(r['autoattack'])}** (n {r['n_aa']})"
        ema = "-" if r["ema_decay"] is None else f"{r['ema_decay']:g}"
        lines.append(
            f"| {r['name']} | {r['recipe']} | {_eps_label(r['eps'])} | {ema} | {r['epochs']} | {r['steps']} "
            f"| {fmt(r['clean'])} | **{fmt(r['pgd10'])}** | {aa} | {r['train_s'] / 60:.1f} "
            f"({r['probe_s'] / 60:.1f}) | {r['eval_s'] / 60:.1f} ({r['aa_s'] / 60:.1f}) |"
        )
    lines.append(
        "\n`X` and `X_ema` are one training run: `X` its trained weights, `X_ema` their EMA (the decay in "
        "column EMA); they share the training columns. The guard's PGD accuracy on its probe of training "
        "images (the trained weights, not the average) before training, then after each epoch; the epochs "
        "it flagged as a collapse:"
    )
    for r in (r for r in rows if r["ema_decay"] is None):  # one per run: an X_ema row shares its X's
        flagged = ", ".join(map(str, r["guard_flagged"])) or "none"
        lines.append(f"- {r['name']}: {' → '.join(f'{p:.2f}' for p in r['guard_pgd'])}; flagged: {flagged}")
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--rows",
        nargs="+",
        choices=list(BY_NAME),
        default=list(BY_NAME),
        metavar="RECIPE",
        help=f"recipes to run, in this order (default all; each gives its X_ema row too where it keeps "
        f"an EMA): {', '.join(BY_NAME)}",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=yaml.safe_load(CONFIG.read_text())["trainer"]["max_epochs"],
        help="training epochs of every row (default: the config's, 15)",
    )
    p.add_argument("--pretrain-epochs", type=int, help="finetune: clean epochs of the total (default a third)")
    p.add_argument("--data", help="ImageFolder tree (default $ROBUST_DATA or ../shared/data, cifar10-subset)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda; cuda takes cifar10_fast's settings")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument(
        "--cifar-stem",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ResNet18 CIFAR stem (default: the config's, on); the torchvision stem is ~6x faster on CPU",
    )
    p.add_argument("--batch-size", type=int, help="training batch size (default: the config's, 128)")
    p.add_argument("--limit-train-batches", type=int, help="training batches per epoch (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-images", type=int, help="evenly spaced test images for clean and PGD-10 (default all)")
    p.add_argument("--aa-images", type=int, default=200, help="evenly spaced test images for AutoAttack (0: none)")
    p.add_argument(
        "--train-args",
        default="",
        help="more train.py arguments for every stage, e.g. "
        '--train-args="--overfit_guard.n 32" (not the batch size: use --batch-size)',
    )
    p.add_argument("--out", type=Path, help="JSON-lines file: each row is appended; rows it holds are not rerun")
    p.add_argument("--logs", default="runs/recipes", help="TensorBoard logs and checkpoints (default runs/recipes)")
    return p.parse_args(argv)


def setup_of(args: argparse.Namespace, device: torch.device) -> Setup:
    """The :class:`Setup` the arguments ask for; the steps per epoch from the training images found."""
    root = Path(args.data) if args.data else shared_data_dir() / "cifar10-subset"
    dm = ImageFolder(root=str(root))
    dm.setup()
    batch = args.batch_size or yaml.safe_load(CONFIG.read_text())["data"]["init_args"]["batch_size"]
    per_epoch = math.ceil(len(dm.train_set) / batch)
    if args.limit_train_batches is not None:
        per_epoch = min(per_epoch, args.limit_train_batches)
    pretrain = args.pretrain_epochs if args.pretrain_epochs is not None else max(1, args.epochs // 3)
    return Setup(
        str(root.resolve()),
        args.epochs,
        pretrain,
        per_epoch,
        device.type,
        args.cifar_stem,
        args.batch_size,
        args.limit_train_batches,
        args.seed,
        tuple(shlex.split(args.train_args)),
        args.test_images,
        args.aa_images,
        args.logs,
    )


def compare(args: argparse.Namespace, command: list[str]) -> list[dict]:
    """Run (or read back from ``args.out``) the rows asked for, printing each; print the table; return the rows."""
    if args.threads < 1:
        raise RobustError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    setup = setup_of(args, device)
    print(machine(device), flush=True)
    for name in args.rows:  # refuse a bad setup before any training
        stages(BY_NAME[name], setup)
    done = saved_rows(args.out, setup)
    rows, read_back = [], 0
    for recipe in map(BY_NAME.get, args.rows):  # each run's rows once measured: a long run can be read midway
        saved = finished(recipe, done)
        if saved is not None:
            print(f"# {recipe.name}: already in {args.out}, not rerun", flush=True)
            rows += saved
            read_back += len(saved)
            continue
        for row in run_recipe(recipe, setup, device):
            rows.append(row)
            print("ROW " + json.dumps(row), flush=True)
            if args.out is not None:
                append_row(args.out, row)
    print(
        f"\n{machine(device)}; {setup.root}, {setup.epochs} epochs (finetune: {setup.pretrain_epochs} clean), "
        f"{setup.steps_per_epoch} steps per epoch, seed {setup.seed}; PGD-10 with step eps/4 and random start; "
        f"command: python experiments/recipes.py {shlex.join(command)}\n"
    )
    print(markdown_table(rows))
    if read_back:
        print(f"\n{read_back} row(s) read back from {args.out}; each has its own machine and date there.")
    return rows


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (2 for bad input, with a one-line ``error:`` on stderr)."""
    command = sys.argv[1:] if argv is None else argv
    return exit_code(lambda: compare(parse_args(command), command))


if __name__ == "__main__":
    sys.exit(main())
