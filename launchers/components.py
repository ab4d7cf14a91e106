"""TorchX components for the MEC pipeline's stages, built on ``torchx.components.dist.ddp``.

Each component launches ``python -m torchrec_mec.cli <stage>`` under ``torchrun`` with ``j``
= ``{nnodes}x{nproc_per_node}`` processes, so the same component runs here with the local
scheduler and on Slurm or Kubernetes::

    torchx run -s local_cwd launchers/components.py:run --out runs/syn --format synthetic \\
        --preset sample --j 1x2
    torchx run -s slurm launchers/components.py:pretrain --out /shared/runs/criteo \\
        --data /shared/criteo/day_0.tsv --format criteo --j 4x8 --gpu 8 --image <image>

Flags that a component does not name go after ``--`` to ``mec`` unchanged
(``-- --set pretrain.epochs=2 --model dlrm_dcn``). The run directory (``--out``) and the data
must be on storage every node sees. See docs/distributed.md.
"""
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components.dist import ddp

DEFAULT_IMAGE = "ghcr.io/pytorch/torchx:0.7.0"


def _mec(
    command: str,
    out: str,
    flags: List[str],
    extra: List[str],
    j: str,
    cpu: int,
    gpu: int,
    memMB: int,
    h: Optional[str],
    image: str,
    env: Optional[Dict[str, str]],
    max_retries: int,
    rdzv_port: int,
) -> specs.AppDef:
    return ddp(command, "--out", out, "--no-progress", *flags, *extra,
               m="torchrec_mec.cli", name=f"mec-{command}", j=j, cpu=cpu, gpu=gpu, memMB=memMB,
               h=h, image=image, env=env, max_retries=max_retries, rdzv_port=rdzv_port)


def _settings_flags(preset: str, config: Optional[str]) -> List[str]:
    return ["--preset", preset] + (["--config", config] if config else [])


def _data_flags(data: Optional[str], format: Optional[str]) -> List[str]:
    return (["--data", data] if data else []) + (["--format", format] if format else [])


def run(
    *mec_args: str,
    out: str,
    format: str,
    data: Optional[str] = None,
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
    """MEC end to end (``mec run``): prepare, pretrain, compress, finetune, evaluate, report.

    Args:
        mec_args: further ``mec run`` flags (after ``--``), e.g. ``--set finetune.epochs=2``.
        out: run directory (shared by all nodes).
        format: ``criteo``, ``avazu`` or ``synthetic``.
        data: the raw data file (none for ``synthetic``).
        preset: settings preset (``published`` or ``sample``).
        config: a YAML or JSON settings file.
        j: ``{nnodes}x{nproc_per_node}``, e.g. ``1x2`` or ``4x8``.
        cpu: CPUs per node.
        gpu: GPUs per node (NCCL is used when CUDA is available).
        memMB: memory per node in MB.
        h: a registered named resource (overrides cpu, gpu, memMB).
        image: container image for container schedulers (local_cwd ignores it).
        env: environment variables, e.g. ``PYTHONPATH=/repo``.
        max_retries: times the scheduler retries a failed job (the stages resume).
        rdzv_port: rendezvous port of rank 0.
    """
    return _mec("run", out, _data_flags(data, format) + _settings_flags(preset, config),
                list(mec_args), j, cpu, gpu, memMB, h, image, env, max_retries, rdzv_port)


def pretrain(
    *mec_args: str,
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
    """Stage 1 (``mec pretrain``), data-parallel over ranks with DistributedModelParallel.

    Args:
        mec_args: further ``mec pretrain`` flags (after ``--``).
        out: run directory (shared by all nodes); reads ``out/data``, writes ``out/pretrain``.
        data: the raw data file; with ``format``, it is prepared into ``out/data`` first.
        format: ``criteo``, ``avazu`` or ``synthetic``; omit if ``out/data`` is prepared.
        preset: settings preset.
        config: a YAML or JSON settings file.
        j: ``{nnodes}x{nproc_per_node}``.
        cpu: CPUs per node.
        gpu: GPUs per node.
        memMB: memory per node in MB.
        h: a registered named resource.
        image: container image.
        env: environment variables.
        max_retries: scheduler retries (training resumes from its checkpoint).
        rdzv_port: rendezvous port of rank 0.
    """
    return _mec("pretrain", out, _data_flags(data, format) + _settings_flags(preset, config),
                list(mec_args), j, cpu, gpu, memMB, h, image, env, max_retries, rdzv_port)


def compress(
    *mec_args: str,
    out: str,
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
    """Stage 2 (``mec compress``): the tables are spread over the ranks.

    Args:
        mec_args: further ``mec compress`` flags (after ``--``).
        out: run directory; reads ``out/pretrain``, writes ``out/compress``.
        preset: settings preset.
        config: a YAML or JSON settings file.
        j: ``{nnodes}x{nproc_per_node}``.
        cpu: CPUs per node.
        gpu: GPUs per node.
        memMB: memory per node in MB.
        h: a registered named resource.
        image: container image.
        env: environment variables.
        max_retries: scheduler retries (finished tables are not redone).
        rdzv_port: rendezvous port of rank 0.
    """
    return _mec("compress", out, _settings_flags(preset, config), list(mec_args), j, cpu, gpu,
                memMB, h, image, env, max_retries, rdzv_port)


def finetune(
    *mec_args: str,
    out: str,
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
    """Stage 3 (``mec finetune``), data-parallel with the QEBC sharder.

    Args:
        mec_args: further ``mec finetune`` flags (after ``--``).
        out: run directory; reads ``out/data``, ``out/pretrain``, ``out/compress``.
        preset: settings preset.
        config: a YAML or JSON settings file.
        j: ``{nnodes}x{nproc_per_node}``.
        cpu: CPUs per node.
        gpu: GPUs per node.
        memMB: memory per node in MB.
        h: a registered named resource.
        image: container image.
        env: environment variables.
        max_retries: scheduler retries (training resumes from its checkpoint).
        rdzv_port: rendezvous port of rank 0.
    """
    return _mec("finetune", out, _settings_flags(preset, config), list(mec_args), j, cpu, gpu,
                memMB, h, image, env, max_retries, rdzv_port)


def evaluate(
    *mec_args: str,
    out: str,
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
    """Stage 4 (``mec evaluate``): each rank scores its slice of the test split.

    Args:
        mec_args: further ``mec evaluate`` flags (after ``--``).
        out: run directory; writes ``out/evaluate``.
        preset: settings preset.
        config: a YAML or JSON settings file.
        j: ``{nnodes}x{nproc_per_node}``.
        cpu: CPUs per node.
        gpu: GPUs per node.
        memMB: memory per node in MB.
        h: a registered named resource.
        image: container image.
        env: environment variables.
        max_retries: scheduler retries.
        rdzv_port: rendezvous port of rank 0.
    """
    return _mec("evaluate", out, _settings_flags(preset, config), list(mec_args), j, cpu, gpu,
                memMB, h, image, env, max_retries, rdzv_port)
