"""``mec``: the MEC pipeline from the command line. Parses flags and config, calls
``torchrec_mec.pipeline``, nothing else.

    mec run --data day_0.tsv --format criteo --out runs/criteo      # everything, then report
    mec run --format synthetic --out runs/syn --preset sample        # generated data
    mec prepare|pretrain|compress|finetune|evaluate|report --out DIR  # one stage

Under ``torchrun`` every stage runs on all ranks (see docs/distributed.md).
"""
import argparse
import logging
import os
import sys
from typing import Any, Dict, Optional, Sequence

from torchrec_mec.artifacts import ArtifactError
from torchrec_mec.data import CorruptDatasetError, DataFormatError
from torchrec_mec.models import MODEL_NAMES
from torchrec_mec.pipeline import (
    FORMATS,
    PRESETS,
    Settings,
    SettingsError,
    compress,
    evaluate,
    finetune,
    load_settings,
    prepare,
    pretrain,
    run,
    stage_dir,
    summary,
    write_report,
)
from torchrec_mec.pipeline.settings import DEFAULT_PRESET

STAGE_COMMANDS = ("prepare", "pretrain", "compress", "finetune", "evaluate", "report", "run")


def build_parser() -> argparse.ArgumentParser:
    """The ``mec`` argument parser (one sub-command per stage, plus ``run``)."""
    parser = argparse.ArgumentParser(
        prog="mec", description="MEC embedding compression for TorchRec CTR models.",
        epilog="Settings: a preset, then --config FILE, then the flags below and --set KEY=VALUE "
               "(dotted keys, e.g. --set compress.quantizer.codebook_size=64). See "
               "docs/pipeline.md.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "run": "all stages on a data set, then report.json, plots and a summary",
        "prepare": "encode the raw data set (or generate the synthetic one) into DIR/data",
        "pretrain": "stage 1: train the model with full tables, count id popularity",
        "compress": "stage 2: MEC-quantize every table with >= min_rows rows",
        "finetune": "stage 3: train the model on codes (QuantizedEmbeddingBagCollection)",
        "evaluate": "stage 4: test AUC, log loss and embedding memory of both models",
        "report": "write DIR/report.json and DIR/plots from the stages' outputs",
    }
    for name in STAGE_COMMANDS:
        p = sub.add_parser(name, help=helps[name], description=helps[name])
        p.add_argument("--out", required=True, metavar="DIR",
                       help="run directory; each stage writes DIR/<stage>/")
        if name in ("run", "prepare", "pretrain"):
            p.add_argument("--data", metavar="PATH",
                           help="raw data file (not for --format synthetic)")
            p.add_argument("--format", choices=FORMATS,
                           required=name in ("run", "prepare"),
                           help="input format" + ("" if name != "pretrain" else
                                                  "; with it, pretrain prepares DIR/data first"))
        if name != "report":
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
            p.add_argument("--min-rows", type=int, help="compress.min_rows")
            p.add_argument("--num-subspaces", type=int, help="compress.quantizer.num_subspaces (M)")
            p.add_argument("--codebook-size", type=int, help="compress.quantizer.codebook_size (K)")
            p.add_argument("--force", action="store_true",
                           help="rerun even if outputs are up to date (drops checkpoints)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The settings the flags ask for: preset, then ``--config``, then flags and ``--set``."""
    overrides: Dict[str, Any] = {}
    shortcuts = {"model": ["model.name"],
                 "seed": ["pretrain.seed", "finetune.seed", "compress.quantizer.seed"],
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``mec``; returns the exit status (2: bad usage or settings, 1: a missing
    or corrupted input, which the message names)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    # TorchRec and FBGEMM log every table at INFO; show theirs from WARNING, ours from INFO.
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank {rank}] %(message)s",
                        datefmt="%H:%M:%S", force=True)
    logging.getLogger("torchrec_mec").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    try:
        return _dispatch(args)
    except SettingsError as e:
        print(f"mec {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ArtifactError, CorruptDatasetError, DataFormatError, FileNotFoundError,
            ValueError) as e:
        print(f"mec {args.command}: error: {e}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    out, progress = args.out, not args.no_progress
    if args.command == "report":
        print(summary(write_report(out)))
        return 0
    settings = settings_from_args(args)
    common = {"force": args.force, "progress": progress}
    d = {s: stage_dir(out, s) for s in ("data", "pretrain", "compress", "finetune", "evaluate")}
    if args.command == "run":
        report = run(args.data, args.format, out, settings, **common)
        if report:
            print(summary(report))
    elif args.command == "prepare":
        prepare(args.data, args.format, d["data"], settings, **common)
    elif args.command == "pretrain":
        if args.format is not None:
            prepare(args.data, args.format, d["data"], settings, progress=progress)
        pretrain(d["data"], d["pretrain"], settings, **common)
    elif args.command == "compress":
        compress(d["pretrain"], d["compress"], settings, **common)
    elif args.command == "finetune":
        finetune(d["data"], d["pretrain"], d["compress"], d["finetune"], settings, **common)
    elif args.command == "evaluate":
        evaluate(d["data"], d["pretrain"], d["finetune"], d["evaluate"], settings, **common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
