"""``mec``: the MEC pipeline from the command line. Parses flags and config, calls
``torchrec_mec.pipeline``'s runner, nothing else.

    mec run --data day_0.tsv --format criteo --out runs/criteo      # everything, then report
    mec run --format synthetic --out runs/syn --preset sample        # generated data
    mec prepare|pretrain|compress|finetune|evaluate|report --out DIR  # one stage
    mec export --out DIR [--stage finetune] [--to FILE]              # one file of a model

The sub-commands are the stages of ``pipeline.graph.STAGES``, plus ``run`` and ``export``. Under
``torchrun`` every stage runs on all ranks (see docs/distributed.md).
"""
import argparse
import logging
import os
import sys
from typing import Any, Dict, Optional, Sequence, TextIO

from torchrec_mec.artifacts import ArtifactError
from torchrec_mec.data import CorruptDatasetError, DataFormatError
from torchrec_mec.models import MODEL_NAMES
from torchrec_mec.pipeline import (
    FORMATS,
    PRESETS,
    STAGE_NAMES,
    DataSource,
    RunLockedError,
    Settings,
    SettingsError,
    StageError,
    TrainingDivergedError,
    load_settings,
    read_report,
    run,
    run_stages,
    stage_dir,
    summary,
)
from torchrec_mec.pipeline.compare import PLOT_FILE, describe, read_comparisons
from torchrec_mec.pipeline.graph import stage
from torchrec_mec.pipeline.outputs import export_model
from torchrec_mec.pipeline.settings import DEFAULT_PRESET
from torchrec_mec.quantize.budget import BudgetError

EXPORT_STAGES = ("pretrain", "finetune", "update")
EXPORT_HELP = ("write a stage's model (saved shard by shard) as one file, for small models and "
               "serving (outputs.load_exported_model reads it)")
SOURCE_COMMANDS = ("run", "prepare", "pretrain")
"""The commands that take ``--data`` / ``--format`` (``pretrain``: to prepare DIR/data first)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``mec`` argument parser (one sub-command per stage, plus ``run`` and ``export``)."""
    parser = argparse.ArgumentParser(
        prog="mec", description="MEC embedding compression for TorchRec CTR models.",
        epilog="Settings: a preset, then --config FILE, then the flags below and --set KEY=VALUE "
               "(dotted keys, e.g. --set compress.quantizer.codebook_size=64). See "
               "docs/pipeline.md.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {"run": "all stages on a data set, then report.json, plots and a summary",
             **{s: stage(s).help for s in STAGE_NAMES}}
    for name in ("run", *STAGE_NAMES):
        p = sub.add_parser(name, help=helps[name], description=helps[name])
        p.add_argument("--out", required=True, metavar="DIR",
                       help="run directory; each stage writes DIR/<stage>/")
        if name in SOURCE_COMMANDS:
            p.add_argument("--data", metavar="PATH",
                           help="raw data file (not for --format synthetic)")
            p.add_argument("--format", choices=FORMATS,
                           required=name in ("run", "prepare"),
                           help="input format" + ("" if name != "pretrain" else
                                                  "; with it, pretrain prepares DIR/data first"))
        if name == "run" or stage(name).reads is not None:
            p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                           help=f"base settings (default {DEFAULT_PRESET!r}: MEC's published "
                                "settings; 'sample': the small demo)")
            p.add_argument("--config", metavar="FILE", help="YAML or JSON settings file")
            p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                           help="override settings, e.g. --set finetune.epochs=2 "
                                "model.name=deepfm (repeatable)")
            p.add_argument("--model", choices=MODEL_NAMES, help="model.name")
            p.add_argument("--seed", type=int,
                           help="pretrain.seed, finetune.seed and compress.quantizer.seed")
            p.add_argument("--target-ratio", type=float, metavar="R",
                           help="compress.target_ratio: embedding memory at most float32 / R; "
                                "stage 2 chooses which tables to compress and their M and K")
            p.add_argument("--min-rows", type=int, help="compress.min_rows")
            p.add_argument("--num-subspaces", type=int, help="compress.quantizer.num_subspaces (M)")
            p.add_argument("--codebook-size", type=int, help="compress.quantizer.codebook_size (K)")
        p.add_argument("--force", action="store_true",
                       help="redo " + ("every stage" if name == "run" else "the stage") +
                            " from scratch even if up to date (drops checkpoints)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        if name == "run":
            p.add_argument("--compare", action="store_true",
                           help="also run `mec compare` (MEC against the alternatives at equal "
                                "memory, compare.ratios; costly) and report its comparisons")
    p = sub.add_parser("export", help=EXPORT_HELP, description=EXPORT_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="the run directory")
    p.add_argument("--stage", choices=EXPORT_STAGES, default="finetune",
                   help="whose model (default: finetune)")
    p.add_argument("--to", metavar="FILE", help="the file to write (default DIR/<stage>.mec)")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The settings the flags ask for: preset, then ``--config``, then flags and ``--set``."""
    overrides: Dict[str, Any] = {}
    shortcuts = {"model": ["model.name"],
                 "seed": ["pretrain.seed", "finetune.seed", "compress.quantizer.seed"],
                 "target_ratio": ["compress.target_ratio"],
                 "min_rows": ["compress.min_rows"],
                 "num_subspaces": ["compress.quantizer.num_subspaces"],
                 "codebook_size": ["compress.quantizer.codebook_size"]}
    for flag, keys in shortcuts.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.update(dict.fromkeys(keys, value))
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SettingsError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value
    return load_settings(args.preset, args.config, overrides)


class _StderrHandler(logging.StreamHandler):
    """Writes each record to ``sys.stderr`` as it is at that moment, not as it was when ``main``
    ran: pytest's capture swaps ``sys.stderr`` and closes the stream it swapped in, and a handler
    that kept that stream failed every later record with "Logging error ... I/O operation on
    closed file" (as ``logging.lastResort`` does)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property  # read-only: the stream is always the current sys.stderr
    def stream(self) -> TextIO:
        return sys.stderr


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``mec``; returns the exit status (2: bad usage or settings, a target
    ratio that cannot be met included; 1: a missing, stale or corrupted input, a run directory
    in use, or a diverged training, which the message
    names)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a file; give the run directory (new or existing)")
    rank = int(os.environ.get("RANK", "0"))
    # TorchRec and FBGEMM log every table at INFO; show theirs from WARNING, ours from INFO.
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank {rank}] %(message)s",
                        datefmt="%H:%M:%S", force=True, handlers=[_StderrHandler()])
    logging.getLogger("torchrec_mec").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    try:
        return _dispatch(args)
    except (SettingsError, BudgetError) as e:
        print(f"mec {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ArtifactError, CorruptDatasetError, DataFormatError, FileNotFoundError, ValueError,
            RunLockedError, StageError, TrainingDivergedError) as e:
        print(f"mec {args.command}: error: {e}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "export":
        to = args.to or os.path.join(args.out, f"{args.stage}.mec")
        print(export_model(stage_dir(args.out, args.stage), to))
        return 0
    out, progress = args.out, not args.no_progress
    settings = None if args.command == "report" else settings_from_args(args)
    source = (DataSource(args.format, args.data) if getattr(args, "format", None) is not None
              else None)
    if args.command == "run":
        assert settings is not None and source is not None
        report = run(source.path, source.format, out, settings, force=args.force,
                     progress=progress, compare=args.compare)
        if report:
            print(summary(report))
        return 0
    run_stages(out, args.command, settings, source=source,
               redo=("prepare",) if source is not None else (),
               force=(args.command,) if args.force else (), progress=progress)
    if args.command == "report" and int(os.environ.get("RANK", "0")) == 0:
        print(summary(read_report(out)))
    if args.command == "compare":
        rows = read_comparisons(stage_dir(out, "compare"))["comparisons"]
        print("\n".join(["at equal embedding memory:", *(f"  {describe(r)}" for r in rows),
                         f"  plot: {os.path.join(stage_dir(out, 'compare'), PLOT_FILE)}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
