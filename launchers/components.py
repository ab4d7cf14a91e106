"""The TorchX component of the MEC pipeline, built on ``torchx.components.dist.ddp``.

One component, ``mec``, launches ``python -m torchrec_mec.cli <stage>`` under ``torchrun`` with
``j`` = ``{nnodes}x{nproc_per_node}`` processes, for any stage of ``pipeline.graph.STAGES`` or
``run`` (all of them), so the same command runs here with the local scheduler and on Slurm or
Kubernetes::

    torchx run -s local_cwd launchers/components.py:mec --stage run --out runs/syn \\
        --format synthetic --preset sample --j 1x2
    torchx run -s slurm launchers/components.py:mec --stage pretrain --out /shared/runs/criteo \\
        --data /shared/criteo/day_0.tsv --format criteo --j 4x8 --gpu 8 --image <image>

Flags that the component does not name go after ``--`` to ``mec`` unchanged
(``-- --set pretrain.epochs=2 --model dlrm_dcn``). The run directory (``--out``) and the data
must be on storage every node sees. This file is loaded by path (``launchers/components.py:mec``);
it is not an installed package. See docs/distributed.md.
"""
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components.dist import ddp

from torchrec_mec.cli import SOURCE_COMMANDS
from torchrec_mec.pipeline import STAGE_NAMES
from torchrec_mec.pipeline.graph import stage as graph_stage

DEFAULT_IMAGE = "ghcr.io/pytorch/torchx:0.7.0"


def mec(
    *mec_args: str,
    stage: str,
    out: str,
    data: Optional[str] = None,
    format: Optional[str] = None,
    preset: str = "published",
    config: Optional[str] = None,
    j: str = "1x2",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    image: str = DEFAULT_IMAGE,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """One ``mec`` command (a stage, or ``run`` for all of them) as a torchrun job.

    Stages 1 and 3 train data-parallel with DistributedModelParallel, stage 2 spreads the tables
    over the ranks, evaluation splits the test set; rank 0 holds the run directory's lock and
    prepares the data. A job the scheduler restarts (``max_retries``) resumes: training from its
    last checkpoint, stage 2 from its finished tables, finished stages skipped.

    Args:
        mec_args: further ``mec`` flags (after ``--``), e.g. ``--set finetune.epochs=2``.
        stage: ``run``, or one stage: ``prepare``, ``pretrain``, ``compress``, ``finetune``,
            ``evaluate``, ``report``.
        out: run directory (shared by all nodes).
        data: the raw data file (none for ``synthetic``); for ``run``, ``prepare``, ``pretrain``.
        format: ``criteo``, ``avazu`` or ``synthetic``; required for ``run`` and ``prepare``;
            for ``pretrain``, prepares ``out/data`` first.
        preset: settings preset (``published`` or ``sample``).
        config: a YAML or JSON settings file.
        j: ``{nnodes}x{nproc_per_node}``, e.g. ``1x2`` or ``4x8``.
        cpu: CPUs per node.
        gpu: GPUs per node (NCCL is used when CUDA is available).
        memMB: memory per node in MB.
        h: a registered named resource (overrides cpu, gpu, memMB).
        image: container image for container schedulers (local_cwd ignores it).
        env: environment variables, e.g. ``PYTHONPATH=/repo``.
        max_retries: times the scheduler retries a failed job.
        rdzv_port: rendezvous port of rank 0.
    """
    if stage != "run" and stage not in STAGE_NAMES:
        raise ValueError(f"--stage must be run or one of {', '.join(STAGE_NAMES)}, got {stage!r}")
    flags: List[str] = []
    if data is not None or format is not None:
        if stage not in SOURCE_COMMANDS:
            raise ValueError(f"--data/--format are for {', '.join(SOURCE_COMMANDS)}, not {stage}")
        flags += (["--data", data] if data else []) + (["--format", format] if format else [])
    if stage == "run" or graph_stage(stage).reads is not None:
        flags += ["--preset", preset] + (["--config", config] if config else [])
    return ddp(stage, "--out", out, "--no-progress", *flags, *mec_args,
               m="torchrec_mec.cli", name=f"mec-{stage}", j=j, cpu=cpu, gpu=gpu, memMB=memMB,
               h=h, image=image, env=env, max_retries=max_retries, rdzv_port=rdzv_port)
