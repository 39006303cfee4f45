"""Command line: ``python -m ranksearch {run,pretrain,ranks,...} ...``. User mistakes exit 2 with one line."""

import argparse
import math
import os
import sys
from fractions import Fraction
from pathlib import Path

from . import __version__
from .decompose import conv_decompositions, factor_methods
from .models import model_names
from .objectives.registry import COSTS, parse_objectives
from .study.attrs import FAIL_REASON
from .study.config import SAMPLERS, WORKER_STORAGE_ENV, Config, default_storage_url, load_config
from .utils.errors import MASK, UserError, shown_url
from .utils.interrupts import Terminated, interrupted_line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parse_ranks(text: str) -> list[float]:
    try:
        return [float(Fraction(token.strip())) for token in text.split(",")]
    except (ValueError, ZeroDivisionError, OverflowError):  # not a number, 1/0, 1e400
        raise UserError(f"--ranks {text!r}: give comma-separated ranks such as 8/32,8/32,4/32,2/32,2/32") from None


def _parse_names(text: str) -> list[str]:
    """Comma-separated names; "none" is the empty list."""
    return [] if text.strip() == "none" else [token.strip() for token in text.split(",")]


def _choices(names, default: str) -> str:
    """Registered choices for a help text: ``tucker2 (default) | cp``."""
    return " | ".join(f"{name} (default)" if name == default else name for name in names)


def _out_path(text: str) -> Path:
    """An ``--out`` path; an empty one is refused (it would be the current folder, unasked)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path: give a folder or file name ('.' for the current folder)")
    return Path(text)


SPEED_BATCH_MAX = 4096  # export --speed-batch: a larger batch is a typo (and a long measurement)
FINETUNE_EPOCHS_MAX = 1000  # export's refine: more is a typo (1e9 ran silently past any patience)
REFINE_LR_MAX = 10.0  # export's refine: a larger peak rate per batch is a typo (1e300 overflowed SGD's float32)
_DECOMPOSITION_HELP = f"what k x k convs become: {_choices(conv_decompositions(), Config.decomposition)}"


def _plugin_flag(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--plugin", action="append", dest="plugins", metavar="FILE.py", help=help_text)


def _config_flags(parser: argparse.ArgumentParser) -> None:
    _plugin_flag(parser, "a Python file (or module) to import first: it may register a model, a decomposition or a "
                 "cost (see README, 'Extending'); repeat for more; recorded in the study by content (SHA-256), and "
                 "imported by later commands only when passed again")  # fmt: skip
    parser.add_argument("--config", help="YAML config (default: the built-in full-size config, configs/default.yaml)")
    parser.add_argument("--data-dir", help="an ImageFolder tree with train/ and test/ (any image size, any classes), "
                        "or torchvision's CIFAR-10 folder")  # fmt: skip
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=None,
                        help="download torchvision's CIFAR-10 into --data-dir when it holds none")  # fmt: skip
    parser.add_argument("--model", help=" | ".join(model_names()))
    parser.add_argument("--device", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads of each process (default: torch's "
                        "for one process, the cores split among --workers); on a machine shared with other work, "
                        "lower it")  # fmt: skip
    parser.add_argument("--seed", type=int, help="seed of sampler, pretraining and fine-tunes")
    parser.add_argument("--width", type=float, help="channel multiplier of the model")
    parser.add_argument("--num-classes", type=int, help="classes of the data (checked against its class folders); "
                        "a config without num_classes takes the data's")  # fmt: skip
    parser.add_argument("--val-size", type=int, help="validation images held out of the training set")
    parser.add_argument("--normalize", metavar="auto|data|cifar10|imagenet|M1,M2,M3/S1,S2,S3",
                        help="the inputs' per-channel mean/std, of pixel / 255 (default auto: CIFAR-10's at 32x32, "
                        "else the training images' own); with --weights, what they were trained with")  # fmt: skip
    parser.add_argument("--data-memory-share", type=float, metavar="S", help="decoded images up to this share of "
                        "the RAM (and GPU memory) are held in memory, larger data is streamed from memory-mapped "
                        "files beside it (default 0.25; 0: always streamed)")  # fmt: skip
    parser.add_argument("--pretrain-epochs", type=int, help="epochs of baseline pretraining")
    parser.add_argument("--min-baseline-accuracy", type=float, metavar="F", help="stop when the baseline's val "
                        "accuracy is under F (default: chance + 0.1; 0: go on whatever it is)")  # fmt: skip
    parser.add_argument("--weights", metavar="FILE", help="your model's trained weights (torch.save("
                        "model.state_dict(), FILE), or a checkpoint holding them; torchvision's files as they are): "
                        "the baseline, measured on the data, no pretraining; a study records the file's "
                        "SHA-256")  # fmt: skip


def _run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, help="trials to ADD to the study (a re-run resumes it); default: "
                        "the config's trials (200 in the default config)")  # fmt: skip
    parser.add_argument("--study-name", help="Optuna study name (default: the config's, else "
                        "<model>-cifar10 on CIFAR-10 and <model>-<data folder> on other data)")  # fmt: skip
    parser.add_argument("--storage", help="Optuna storage URL (default sqlite:///studies/<study-name>.db)")
    parser.add_argument("--sampler", help=_choices(SAMPLERS, Config.sampler))
    parser.add_argument("--budget", metavar="COST=FRACTION", help="budget mode: the best val accuracy with COST "
                        "(macs, params, latency) at or under FRACTION of the baseline's, e.g. macs=0.1")  # fmt: skip
    parser.add_argument("--pruner", help="budget mode: a trial's fine-tune goes on in rungs (x3 steps each) and "
                        "halving (about the best third at each rung go on; default) | hyperband | none (every "
                        "trial to the top rung) decides which")  # fmt: skip
    parser.add_argument("--max-finetune-steps", type=int, help="budget mode: the top rung's fine-tune steps, where "
                        "the best is chosen (default finetune_steps x 9; 0: no rungs)")  # fmt: skip
    parser.add_argument("--reduction-factor", type=int, help="budget mode: each rung's steps as a multiple of the "
                        "last's (default 3)")  # fmt: skip
    parser.add_argument("--objectives", type=parse_objectives, metavar="accuracy,COST[,COST]",
                        help=f"accuracy then one or two of {', '.join(COSTS)} (default accuracy,macs)")  # fmt: skip
    parser.add_argument("--latency-batch", type=int, help="images per forward pass when timing latency (default 1)")
    parser.add_argument("--finetune-steps", type=int, help="fine-tune steps per trial")
    parser.add_argument("--search-space", help="module (one rank per module, default) | layer (one per conv)")
    parser.add_argument("--decomposition", help=_DECOMPOSITION_HELP)
    parser.add_argument("--svd-layers", action=argparse.BooleanOptionalAction, default=None,
                        help="also rank 1x1 convs and linear layers, decomposed by truncated SVD")  # fmt: skip
    parser.add_argument("--decompose-method", help="how factors are chosen: "
                        f"{_choices(factor_methods(), Config.decompose_method)} (see README)")  # fmt: skip
    parser.add_argument("--ranks", action="append", metavar="R1,R2,...",
                        help="try these module ranks first (k/32 each, one per module); repeat for more")  # fmt: skip
    parser.add_argument("--warm-start", type=_parse_names, metavar="vbmf,uniform,sensitivity",
                        help="then try these first: vbmf (the `ranks --vbmf` point), uniform (all modules at "
                        "2, 4, 8, 16 /32; the default), sensitivity (allocations from `ranksearch sensitivity`'s "
                        "curves, measured first when missing), or none; vectors the study holds are "
                        "skipped")  # fmt: skip
    parser.add_argument("--workers", type=int, help="processes adding trials to the study on this machine (default 1)")
    parser.add_argument("--heartbeat-seconds", type=int,
                        help="a silent worker's trial is failed and retried after 2x this (default 60)")  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # RUN:INDEX:TOTAL:THREADS, set by `run --workers N`


def _deliver_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", dest="deliver_out", type=lambda text: str(_out_path(text)), metavar="PATH",
                        help="the delivered model's .pt (default <the study's folder>/<study-name>-delivered.pt); "
                        "with several --deliver fractions, one file each, named -<cost><fraction>")  # fmt: skip
    parser.add_argument("--format", dest="deliver_formats", type=_parse_names, metavar="pt,onnx,torchscript",
                        help="the delivered model's formats, as export writes them (the .pt always)")  # fmt: skip
    parser.add_argument("--deliver", metavar="COST=F1,F2", help="deliver the best model at or under each fraction "
                        "of the baseline's COST (e.g. macs=0.2,0.1; a budget run delivers at its budget), or none")
    parser.add_argument("--deliver-top", type=int, help="the best trials the delivery refines, the best refined val "
                        "delivered (default 1)")  # fmt: skip
    parser.add_argument("--deliver-epochs", type=int, help="epochs of export's default refine each of them gets "
                        "(default 10; 0: none)")  # fmt: skip


def _parse_formats(names: list[str] | None) -> list[str] | None:
    """``--format``'s names with the .pt among them (the file ``load_model`` reads is always written)."""
    return None if names is None else list(dict.fromkeys(["pt", *names]))


# flags that are no config key
_NOT_CONFIG = ("command", "config", "ranks", "worker", "argv", "vbmf", "weakening", "out")


def _resolve(args: argparse.Namespace) -> Config:
    if getattr(args, "worker", None) and os.environ.get(WORKER_STORAGE_ENV):
        args.storage = os.environ[WORKER_STORAGE_ENV]  # a worker's storage, kept off its command line by its parent
    overrides = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    if "deliver_formats" in overrides:
        overrides["deliver_formats"] = _parse_formats(overrides["deliver_formats"])
    if getattr(args, "ranks", None):
        overrides["enqueue_ranks"] = [_parse_ranks(text) for text in args.ranks]
    config = load_config(args.config, overrides)
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    return config


def cmd_run(args: argparse.Namespace) -> int:
    from .run import run_search
    from .search.workers import Worker
    from .study.storage import deleted_study_is_one_line

    config = _resolve(args)
    worker = Worker.parse(args.worker) if args.worker else None
    with deleted_study_is_one_line(config.storage_url(), config.study_name):
        _, ran = run_search(config, argv=args.argv, worker=worker)
    failed = [t for t in ran if t.state.name == "FAIL"]
    if failed and len(failed) == len(ran):
        reason = failed[0].user_attrs.get(FAIL_REASON, "unknown")
        print(f"ranksearch: all {len(failed)} trials failed (first: {reason})", file=sys.stderr)
        return 1
    if worker is None:
        print(closing_line(config))
    return 0


def closing_line(config: Config) -> str:
    """Where ``run`` left its study and how to look at it, the storage's password masked (``shown_url``)."""
    from .inspect.notes import study_command

    url = config.storage_url()
    shown, hint = shown_url(url), study_command("dashboard", config.study_name, config.storage)
    needs = f" (with the real password for {MASK})" if shown != url else ""
    return f"study {config.study_name!r} in {shown}; inspect: {hint}{needs}"


def _baseline(config: Config):
    """The config's pretrained baseline (cached, or pretrained now and cached), and the data it was measured on."""
    from .data.datasets import device_data
    from .train.baseline import check_baseline_source, ensure_baseline
    from .utils.device import resolve_device

    check_baseline_source(config)  # before the data
    data = device_data(config, resolve_device(config.device))
    return ensure_baseline(config, data), data


def cmd_pretrain(args: argparse.Namespace) -> int:
    _baseline(_resolve(args))  # says where it is and what it measured
    return 0


def _ranks_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vbmf", action="store_true", help="estimate each conv's (R_in, R_out) with EVBMF (Kim et "
                        "al. 2015); the only estimator today, so required")  # fmt: skip
    parser.add_argument("--weakening", type=float, default=1.0, help="scales EVBMF's noise variance: 1 plain "
                        "(default), below 1 keeps more components, above 1 fewer")  # fmt: skip
    parser.add_argument("--search-space", help="module (one rank per module, default) | layer (one per conv)")
    parser.add_argument("--decomposition", help=_DECOMPOSITION_HELP)
    parser.add_argument("--svd-layers", action=argparse.BooleanOptionalAction, default=None,
                        help="also rank 1x1 convs and linear layers, decomposed by truncated SVD")  # fmt: skip


def _layer_row(layer) -> str:
    from .models import rank_text

    shape = " x ".join(map(str, layer.shape))
    found, rank = layer.found, rank_text(layer.rank)
    return f"{layer.name:<24} {layer.form:<7} {shape:>20} {found[0]:>9} {found[1]:>5}  {rank:>5}"


def _noise_note(layer) -> str:
    modes = ", ".join(mode for mode, rank in zip(("R_in", "R_out"), layer.found, strict=True) if rank == 0)
    where = f"rank 0 for {modes}" if layer.form == "tucker2" else "rank 0"
    return f"{layer.name}: VBMF found no component above the noise ({where}); using 1"


def _ranks_line(ranks: list[float], config: Config) -> str:
    """The ``--ranks`` text for ``run``, clipped into [rank_min, rank_max] (and saying so when that changed any)."""
    from .models import rank_text
    from .search.warmstart import clip_ranks, ranks_argument

    clipped = clip_ranks(ranks, config.rank_min, config.rank_max)
    note = f"  (clipped into rank_min..rank_max: {rank_text(config.rank_min)}..{rank_text(config.rank_max)})"
    return f"--ranks {ranks_argument(clipped)}" + (note if clipped != ranks else "")


def _ranks_report(estimates, config: Config) -> str:
    """``ranks --vbmf``'s output: a row per rank-carrying layer, a note per layer where VBMF found only noise, a
    line per module (of the config's search space), then the ``--ranks`` text for ``run``."""
    from .models import rank_text

    lines = [
        f"VBMF ranks at weakening {estimates.weakening:g}; rank: the smallest k/32 whose R_in, R_out (of the "
        "layer's form) are at least VBMF's",
        f"{'layer':<24} {'form':<7} {'Cout x Cin x kh x kw':>20} {'VBMF R_in':>9} {'R_out':>5}  {'rank':>5}",
        *(_layer_row(layer) for layer in estimates.layers),
        *(_noise_note(layer) for layer in estimates.layers if layer.found_only_noise),
        "module ranks (the largest of each module's layers'):" if config.search_space == "module" else "layer ranks:",
        *(f"  {module:<22} {rank_text(rank):>5}" for module, rank in estimates.modules.items()),
        _ranks_line(list(estimates.modules.values()), config),
    ]  # fmt: skip
    return "\n".join(lines)


def cmd_ranks(args: argparse.Namespace) -> int:
    """``ranks --vbmf [--weakening W]``: EVBMF's (R_in, R_out) for every rank-carrying layer of the baseline (cached,
    or pretrained now as ``pretrain`` would), each layer's grid rank, each module's, and ``--ranks`` text for ``run``.

    A conv's grid rank is the smallest k/32 whose Tucker-2 ranks (R = max(1, round(k/32 * Cout)), R_in = min(R, Cin),
    R_out = min(R, Cout)) are at least VBMF's in both modes (a 0, only noise, counts as 1; 1 when no k reaches them);
    a 1x1 conv's or linear layer's (``svd_layers``), the smallest whose SVD rank max(1, round(k/32 * min(Cin, Cout)))
    is at least VBMF's; a module's is the largest of its layers'. The math is ``ranksearch.search.warmstart``'s.
    """
    from .objectives.cost_table import cost_table
    from .search.warmstart import clip_ranks, vbmf_ranks

    if not args.vbmf:
        raise UserError("ranks needs --vbmf: VBMF is the only rank estimator today (ranksearch ranks --vbmf ...)")
    if not (math.isfinite(args.weakening) and args.weakening > 0):
        raise UserError(f"--weakening must be a finite number > 0 (1: plain EVBMF), got {args.weakening}")
    config = _resolve(args)
    if config.decomposition != "tucker2":
        raise UserError(f"ranks --vbmf estimates Tucker-2 ranks, not {config.decomposition}'s (decomposition tucker2)")
    baseline, data = _baseline(config)
    estimates = vbmf_ranks(baseline.model, config.search_space, args.weakening)
    print(_ranks_report(estimates, config))
    print(_costs_line(clip_ranks(list(estimates.modules.values()), config.rank_min, config.rank_max),
                      cost_table(baseline.model, config.search_space, config.decomposition,
                                 data.spec.input_size())))  # fmt: skip
    return 0


def _costs_line(ranks: list[float], table) -> str:
    """What the ``--ranks`` vector costs, as ratios to the baseline's (the exact cost table)."""
    return (f"its cost: MACs {table.ratio('macs', ranks):.3f}x, params {table.ratio('params', ranks):.3f}x of the "
            "baseline's")


# `run`'s flags that `sensitivity` does not use: it measures a fixed ladder of points (no sampler, pruner or trial
# count of the user's, no latency). Parsed all the same, since the workers of `run --warm-start sensitivity` get
# run's command line, but refused when typed and hidden from --help.
_NOT_SENSITIVITY = {"trials": "--trials", "ranks": "--ranks", "warm_start": "--warm-start", "sampler": "--sampler",
                    "pruner": "--pruner", "latency_batch": "--latency-batch"}  # fmt: skip


def _sensitivity_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=_out_path, help="folder for sensitivity.png, .html and .csv (default "
                        "studies/<study-name>-sensitivity)")  # fmt: skip
    for action in parser._actions:
        if action.dest in _NOT_SENSITIVITY:
            action.help = argparse.SUPPRESS


def _check_sensitivity_flags(args: argparse.Namespace) -> None:
    """Refuse a `run` flag that `sensitivity` would ignore (see ``_NOT_SENSITIVITY``); a worker's are run's own."""
    given = [flag for dest, flag in _NOT_SENSITIVITY.items() if getattr(args, dest) is not None]
    if given and args.worker is None:
        them = "them (flags of `run`)" if len(given) > 1 else "it (a flag of `run`)"
        raise UserError(f"sensitivity does not use {', '.join(given)}: it measures every module alone at a fixed "
                        f"ladder of ranks; drop {them}")  # fmt: skip


def cmd_sensitivity(args: argparse.Namespace) -> int:
    """``sensitivity``: each module decomposed alone at a ladder of ranks (``ranksearch.search.sensitivity``)."""
    from .search.sensitivity import run_sensitivity
    from .search.workers import Worker

    _check_sensitivity_flags(args)
    config = _resolve(args)
    worker = Worker.parse(args.worker) if args.worker else None
    out = args.out or Path("studies") / f"{config.study_name}-sensitivity"
    run_sensitivity(config, out, argv=args.argv, worker=worker)
    return 0


def _inspect_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study-name", required=True, help="the study to read")
    parser.add_argument("--storage", help="Optuna storage URL (default sqlite:///studies/<study-name>.db)")


def _storage_url(args: argparse.Namespace) -> str:
    return args.storage or default_storage_url(args.study_name)


_WEIGHTS_DIR_HELP = ("server storages (PostgreSQL) only: the study's weights folder, as the run's weights_dir "
                     "(default studies/<study-name>-weights); a SQLite study's are beside its database")  # fmt: skip


def _weights_folder(args: argparse.Namespace) -> Path:
    """The study's kept weights folder (``storage.weights_folder``; ``--weights-dir`` is refused for SQLite, whose
    studies keep them beside the database)."""
    from .study.storage import weights_folder

    return weights_folder(_storage_url(args), args.study_name, args.weights_dir, given_as="--weights-dir")


def _open_study(args: argparse.Namespace, uses: tuple[str, ...]):
    """The study ``--study-name`` names, made by ``run`` (a sensitivity study is refused in one line), with the
    plugins passed (``--plugin``) imported when they are its own; a one-line error when what the command ``uses`` of
    it (its "model", "decomposition", "costs") comes from a plugin not passed."""
    from .search.sensitivity import is_sensitivity_study
    from .study.storage import load_existing_study, load_study_plugins

    study = load_existing_study(_storage_url(args), args.study_name)
    if is_sensitivity_study(study):
        raise UserError(
            f"study {study.study_name!r} holds `ranksearch sensitivity`'s points (each module decomposed alone), not "
            f"a search's trials: {args.command} reads a study made by `ranksearch run`; pass its --study-name (the "
            "sensitivity's table and plots are in the folder its --out named)"
        )
    load_study_plugins(study, args.plugins or [], uses)
    return study


_STUDY_PLUGIN_HELP = ("a plugin the study was made with, checked against its record by content (it may lie elsewhere "
                      "now); needed when the study's {} comes from one: a study's plugins are never imported unless "
                      "passed; repeat for more")  # fmt: skip


def _export_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trial", default="best", help="a trial number, or 'best' (default): the Pareto trial "
                        "with the lowest --objective within --max-drop of the baseline's val accuracy")  # fmt: skip
    parser.add_argument("--objective", help=f"the cost 'best' minimises: {', '.join(COSTS)} or a plugin's "
                        "(default: the study's first cost)")  # fmt: skip
    parser.add_argument("--max-drop", type=float, help="percentage points of val accuracy 'best' may lose "
                        "(default 1.0)")  # fmt: skip
    parser.add_argument("--finetune-epochs", type=int, default=0, help="refine the chosen model E epochs: rate "
                        "rewound to --refine-lr, distilled from the baseline; a killed export resumes")  # fmt: skip
    parser.add_argument("--refine-lr", type=float, help=f"peak learning rate of the refine (default 0.05, at most "
                        f"{REFINE_LR_MAX:g})")  # fmt: skip
    parser.add_argument("--refine-warmup-epochs", type=float, help="epochs of linear warm-up from lr/10 to the "
                        "peak, then cosine to 0 (default 0.3)")  # fmt: skip
    parser.add_argument("--refine-distill", type=float, help="weight in [0, 1] of distillation from the study's "
                        "baseline in the refine loss (default 0.9; 0 = off)")  # fmt: skip
    parser.add_argument("--from-scratch-check", action="store_true", help="also train the same architecture from "
                        "new weights for as many steps (fine-tune + refine) and print both")  # fmt: skip
    parser.add_argument("--format", default="pt", help="pt, onnx, torchscript, comma-separated (the .pt, which "
                        "load_model reads, is always written)")  # fmt: skip
    parser.add_argument("--out", required=True, type=_out_path, help="output file, e.g. exports/best.pt or best.onnx: "
                        "each format is written with its own suffix in place of --out's")  # fmt: skip
    parser.add_argument("--data-dir", help="the study's data (default: the folder recorded in the study)")
    parser.add_argument("--device", help="auto | cpu | cuda (default: the device the trial ran on)")
    parser.add_argument("--speed-batch", type=int, default=None, metavar="B", help="the written model's speed "
                        "against the baseline's is measured here at batch 1 and B (default 32; 0 or 1: batch 1 "
                        "alone), printed and recorded in the .pt")  # fmt: skip
    parser.add_argument("--weights-dir", help=_WEIGHTS_DIR_HELP)
    _plugin_flag(parser, _STUDY_PLUGIN_HELP.format("model, decomposition or a cost"))


def _refine_recipe(args: argparse.Namespace):
    """The default refine recipe with the ``--refine-*`` flags given, checked."""
    import dataclasses

    from .deliver.refine import RefineRecipe

    flags = {"lr": args.refine_lr, "warmup_epochs": args.refine_warmup_epochs, "distill_weight": args.refine_distill}
    given = {field: value for field, value in flags.items() if value is not None}
    if given and args.finetune_epochs == 0:
        raise UserError("--refine-lr, --refine-warmup-epochs and --refine-distill need --finetune-epochs E > 0")
    checks = {
        "lr": ("--refine-lr", lambda v: 0 < v <= REFINE_LR_MAX, f"a finite number > 0, at most {REFINE_LR_MAX:g}"),
        "warmup_epochs": ("--refine-warmup-epochs", lambda v: 0 <= v < args.finetune_epochs,
                          f"a finite number >= 0 and below --finetune-epochs {args.finetune_epochs}"),
        "distill_weight": ("--refine-distill", lambda v: 0 <= v <= 1, "a weight in [0, 1] (0 = no distillation)"),
    }
    for field, value in given.items():
        flag, ok, wanted = checks[field]
        if not (math.isfinite(value) and ok(value)):
            raise UserError(f"{flag} must be {wanted}, got {value}")
    return dataclasses.replace(RefineRecipe(), **given)


EXPORT_INTERRUPTED = ("export interrupted; its files are renamed into place together, so --out holds the earlier "
                      "export's files or all of this one's, never a mix: run it again to export (a refine resumes at "
                      "its last finished epoch)")


def cmd_export(args: argparse.Namespace) -> int:
    """``export``: pick a trial, rebuild, verify (and refine) it, write its files; Ctrl-C and SIGTERM say what they
    left (``main`` prints it: exit 130, 143)."""
    from .utils.interrupts import Interrupted, Terminated, sigterm_interrupts

    try:
        with sigterm_interrupts():
            return _export(args)
    except KeyboardInterrupt as stop:
        raise (Terminated if isinstance(stop, Terminated) else Interrupted)(EXPORT_INTERRUPTED) from None


def _export(args: argparse.Namespace) -> int:
    from .deliver.export import check_out, choose_trial, export_device, export_trial, parse_formats
    from .objectives.latency import SPEED_BATCH

    formats = parse_formats(args.format)
    if args.finetune_epochs < 0:
        raise UserError("--finetune-epochs must be 0 or more")
    if args.max_drop is not None and not (math.isfinite(args.max_drop) and args.max_drop >= 0):
        raise UserError(f"--max-drop must be a finite number >= 0 (percentage points), got {args.max_drop}")
    if args.finetune_epochs > FINETUNE_EPOCHS_MAX:
        raise UserError(f"--finetune-epochs {args.finetune_epochs}: at most {FINETUNE_EPOCHS_MAX} (a refine, not a "
                        "training from scratch)")  # fmt: skip
    recipe = _refine_recipe(args)
    speed_batch = SPEED_BATCH if args.speed_batch is None else args.speed_batch
    if not 0 <= speed_batch <= SPEED_BATCH_MAX:
        raise UserError(f"--speed-batch must be 0..{SPEED_BATCH_MAX} (images per timed forward pass), got "
                        f"{speed_batch}")  # fmt: skip
    paths = check_out(args.out, formats, refine=args.finetune_epochs > 0)
    weights = _weights_folder(args)
    study = _open_study(args, ("model", "decomposition", "costs"))  # it rebuilds, verifies and picks by cost
    trial = choose_trial(study, args.trial, args.max_drop, args.objective)
    export_trial(study, trial, args.data_dir, export_device(trial, args.device), paths, args.finetune_epochs,
                 recipe, args.from_scratch_check, weights, speed_batch)  # fmt: skip
    return 0


def _report_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=_out_path, help="folder for trials.csv, pareto.html, "
                        "pareto.png")  # fmt: skip
    _plugin_flag(parser, _STUDY_PLUGIN_HELP.format("cost (an objective)"))


def cmd_report(args: argparse.Namespace) -> int:
    from .inspect.report import summary, write_report
    from .utils.files import check_writable

    check_writable(args.out, "--out")
    study = _open_study(args, ("costs",))  # its costs' labels and units; no model is built
    paths = write_report(study, args.out)
    print(summary(study))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _dashboard_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080; 0: any free port)")
    parser.add_argument("--weights-dir", help=_WEIGHTS_DIR_HELP)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from .inspect.dashboard import serve

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535 (0: any free port), got {args.port}")
    weights = _weights_folder(args)
    serve(_storage_url(args), args.host, args.port, study_name=args.study_name,
          weights_dir=str(weights) if args.weights_dir else None)  # fmt: skip
    return 0


_COMMANDS = {
    "run": (cmd_run, "search Tucker-2 ranks: pretrain the baseline if needed, then add --trials trials", True),
    "sensitivity": (
        cmd_sensitivity,
        "measure each module decomposed alone at a ladder of ranks: a table, a plot, "
        "and the rank allocations it gives for a ladder of MACs budgets",
        True,
    ),
    "pretrain": (cmd_pretrain, "train (or show) the cached baseline for the config; with --weights, measure "
                 "yours", False),
    "ranks": (cmd_ranks, "estimate ranks from the baseline's weights (--vbmf), as --ranks text for run", False),
    "export": (cmd_export, "write a trial's model (.pt, ONNX, TorchScript), verified against the study", None),
    "report": (cmd_report, "write the trials table (CSV) and Pareto plot (HTML, PNG); print a summary", None),
    "dashboard": (cmd_dashboard, "serve optuna-dashboard for a study on 127.0.0.1 (Ctrl-C to stop)", None),
}


_EXTRA_FLAGS = {
    "run": _deliver_flags, "export": _export_flags, "report": _report_flags, "dashboard": _dashboard_flags,
    "ranks": _ranks_flags, "sensitivity": _sensitivity_flags,
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ranksearch", description="Multi-objective search over Tucker-2 ranks of a CNN.")
    parser.add_argument("--version", action="version", version=f"ranksearch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(_COMMANDS) + "}")
    for name, (_, help_text, is_search) in _COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if is_search is None:  # reads an existing study
            _inspect_flags(sub)
            _EXTRA_FLAGS[name](sub)
            continue
        _config_flags(sub)
        if is_search:
            _run_flags(sub)
        if name in _EXTRA_FLAGS:
            _EXTRA_FLAGS[name](sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `run --workers N` starts its workers with
    command = _COMMANDS[args.command][0]
    try:
        return command(args)
    except UserError as error:
        print(f"ranksearch: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"ranksearch: {interrupted_line(interrupt)}", file=sys.stderr)
        return 143 if isinstance(interrupt, Terminated) else 130
    except Exception as error:  # a storage that failed (killed, blocked by a lock) is one line, the storage's own
        from .study.storage import storage_failure

        why = storage_failure(error)
        if why is None:
            raise
        print(f"ranksearch: error: the study's storage failed ({why}); run again once it works", file=sys.stderr)
        return 1
