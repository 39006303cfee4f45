"""Command line: ``python -m ranksearch {run,pretrain} ...``. User mistakes exit 2 with one line."""

import argparse
import sys
from fractions import Fraction

from . import __version__
from .config import Config, load_config
from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parse_ranks(text: str) -> list[float]:
    try:
        return [float(Fraction(token.strip())) for token in text.split(",")]
    except (ValueError, ZeroDivisionError):
        raise UserError(f"--ranks {text!r}: give comma-separated ranks such as 8/32,8/32,4/32,2/32,2/32") from None


def _config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (default: the built-in full-size config, configs/default.yaml)")
    parser.add_argument("--data-dir", help="CIFAR-10: ImageFolder tree with train/ and test/, or torchvision's folder")
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=None,
                        help="download torchvision's CIFAR-10 into --data-dir when it holds none")  # fmt: skip
    parser.add_argument("--device", help="auto | cpu | cuda")
    parser.add_argument("--seed", type=int, help="seed of sampler, pretraining and fine-tunes")
    parser.add_argument("--width", type=float, help="channel multiplier of the model")
    parser.add_argument("--val-size", type=int, help="validation images held out of the training set")
    parser.add_argument("--pretrain-epochs", type=int, help="epochs of baseline pretraining")


def _run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, help="trials to ADD to the study (a re-run resumes it); default 200")
    parser.add_argument("--study-name", help="Optuna study name (default from the config)")
    parser.add_argument("--storage", help="Optuna storage URL (default sqlite:///studies/<study-name>.db)")
    parser.add_argument("--sampler", help="tpe | nsga2")
    parser.add_argument("--finetune-steps", type=int, help="fine-tune steps per trial")
    parser.add_argument("--ranks", action="append", metavar="R1,..,R5",
                        help="try these module ranks first (k/32 each); repeat for more")  # fmt: skip


def _resolve(args: argparse.Namespace) -> Config:
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "ranks")}
    if getattr(args, "ranks", None):
        overrides["enqueue_ranks"] = [_parse_ranks(text) for text in args.ranks]
    return load_config(args.config, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from .search import run_search

    config = _resolve(args)
    _, new_trials = run_search(config)
    failed = [t for t in new_trials if t.state.name == "FAIL"]
    if failed and len(failed) == len(new_trials):
        reason = failed[0].user_attrs.get("fail_reason", "unknown")
        print(f"ranksearch: all {len(failed)} trials failed (first: {reason})", file=sys.stderr)
        return 1
    print(f"study {config.study_name!r} in {config.storage_url()}; inspect: optuna-dashboard {config.storage_url()}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .baseline import ensure_baseline
    from .data import device_data
    from .train import resolve_device

    config = _resolve(args)
    ensure_baseline(config, device_data(config, resolve_device(config.device)))
    return 0


_COMMANDS = {
    "run": (cmd_run, "search Tucker-2 ranks: pretrain the baseline if needed, then add --trials trials", True),
    "pretrain": (cmd_pretrain, "train (or show) the cached baseline for the config", False),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ranksearch", description="Multi-objective search over Tucker-2 ranks of a CNN.")
    parser.add_argument("--version", action="version", version=f"ranksearch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(_COMMANDS) + "}")
    for name, (_, help_text, is_search) in _COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _config_flags(sub)
        if is_search:
            _run_flags(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = _COMMANDS[args.command][0]
    try:
        return command(args)
    except UserError as error:
        print(f"ranksearch: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ranksearch: interrupted; finished trials are saved: run again to resume", file=sys.stderr)
        return 130
