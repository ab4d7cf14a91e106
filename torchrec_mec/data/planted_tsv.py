"""The planted synthetic data as a Criteo TSV file, to run ``mec run --format criteo`` on rows
whose true click probabilities are known::

    python -m torchrec_mec.data.planted_tsv --rows 600000 --out planted.tsv \\
        [--config benchmarks/planted_dev.yaml] [--seed 0]

writes ``planted.tsv`` (label, 13 integer counts, 26 categoricals as 8 hex digits) and
``planted.tsv.planted.json``: the generator's config and seed, and the planted ceiling, the AUC
of the true probabilities against the labels, over all rows and over each split
``prepare_dataset`` will draw with ``data.split`` and ``data.seed`` (test AUC no model can beat
on that split). ``--config`` reads the ``data`` section of a settings file (its ``synthetic``,
``split`` and ``seed``).
"""
import argparse
import json
import os
from dataclasses import asdict
from typing import Any, Dict, Sequence

import numpy as np
import torch
import yaml
from torchmetrics.classification import BinaryAUROC
from tqdm import tqdm

from torchrec_mec.data.criteo import CRITEO_NUM_DENSE, CRITEO_NUM_SPARSE
from torchrec_mec.data.prepare import assign_splits
from torchrec_mec.data.schema import SPLITS
from torchrec_mec.data.synthetic import SyntheticClickModel, SyntheticConfig

_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_MIX = 0x9E3779B1  # odd: id -> (id * _MIX + salt) mod 2^32 is a bijection on 32-bit ids


def categorical_values(ids: np.ndarray, feature: int) -> np.ndarray:
    """The 8-hex-digit value a Criteo file holds for each raw id of sparse feature
    ``feature``: distinct ids of a feature give distinct values (a bijection mod 2^32).

    Example::

        >>> categorical_values(np.array([0, 1, 0]), feature=2).tolist()
        [b'daa66d13', b'78dde6c4', b'daa66d13']
    """
    salt = (feature + 1) * _MIX
    v = ((ids.astype(np.uint64) * _MIX + salt) & 0xFFFFFFFF).astype(np.uint64)
    shifts = np.arange(28, -1, -4, dtype=np.uint64)
    digits = _HEX[((v[:, None] >> shifts) & 0xF).astype(np.intp)]
    return np.ascontiguousarray(digits).view("S8").ravel()


def criteo_lines(model: SyntheticClickModel, start: int, stop: int) -> bytes:
    """Rows ``start..stop-1`` of the planted data as Criteo TSV lines (missing counts empty)."""
    dense, ids = model.features(start, stop)
    labels = model.labels(start, model.probabilities(dense, ids)).astype(np.int64)
    counts = model.dense_counts(start, stop)
    columns = [labels.astype("S1")]
    for j in range(counts.shape[1]):
        text = np.char.mod(b"%d", np.nan_to_num(counts[:, j]).astype(np.int64))
        columns.append(np.where(np.isnan(counts[:, j]), b"", text))
    columns += [categorical_values(ids[:, f], f) for f in range(ids.shape[1])]
    line = columns[0]
    for column in columns[1:]:
        line = np.char.add(np.char.add(line, b"\t"), column)
    return b"\n".join(line.tolist()) + b"\n"


def planted_ceiling(model: SyntheticClickModel, num_rows: int, split: Sequence[float],
                    split_seed: int, chunk_rows: int = 1 << 16) -> Dict[str, float]:
    """AUC of the true click probabilities against the labels: over ``all`` rows and over each
    split that ``prepare_dataset`` draws for a text file of these rows (``assign_splits``)."""
    metrics = {name: BinaryAUROC() for name in ("all", *SPLITS)}
    for lo in range(0, num_rows, chunk_rows):
        hi = min(lo + chunk_rows, num_rows)
        dense, ids = model.features(lo, hi)
        p = model.probabilities(dense, ids)
        y = torch.from_numpy(model.labels(lo, p)).long()
        p_t = torch.from_numpy(p)
        which = assign_splits(np.arange(lo + 1, hi + 1), split_seed, split)
        metrics["all"].update(p_t, y)
        for k, name in enumerate(SPLITS):
            mask = torch.from_numpy(which == k)
            if mask.any():
                metrics[name].update(p_t[mask], y[mask])
    return {name: float(m.compute()) for name, m in metrics.items()
            if name == "all" or m.update_count}


def write_planted_criteo(config: SyntheticConfig, path: str, *, seed: int = 0,
                         split: Sequence[float] = (0.8, 0.1, 0.1), split_seed: int = 0,
                         chunk_rows: int = 1 << 16, progress: bool = True) -> Dict[str, Any]:
    """Writes ``config.num_rows`` planted rows to ``path`` as a Criteo TSV (through a temporary
    name, renamed when complete) and the sidecar ``path + ".planted.json"``; returns the
    sidecar's content.

    Args:
        config (SyntheticConfig): the generator; needs Criteo's 13 dense and 26 sparse features.
        path (str): the TSV file to write.
        seed (int): the generator's seed.
        split (Sequence[float]): the ``data.split`` the file will be prepared with.
        split_seed (int): the ``data.seed`` it will be prepared with.
        chunk_rows (int): rows generated at a time.
        progress (bool): show a progress bar.

    Raises:
        ValueError: the config does not have the Criteo layout (names its sizes).

    Example::

        >>> import tempfile
        >>> cfg = SyntheticConfig(num_rows=500, table_sizes=(50,) * 26)
        >>> meta = write_planted_criteo(cfg, tempfile.mkdtemp() + "/p.tsv", progress=False)
        >>> 0.5 < meta["ceiling_auc"]["test"] < 1
        True
    """
    if config.num_dense != CRITEO_NUM_DENSE or config.num_sparse != CRITEO_NUM_SPARSE:
        raise ValueError(f"a Criteo file has {CRITEO_NUM_DENSE} dense and {CRITEO_NUM_SPARSE} "
                         f"sparse features; the synthetic config has {config.num_dense} "
                         f"(data.synthetic.num_dense) and {config.num_sparse} "
                         "(data.synthetic.table_sizes)")
    if any(config.ids_added):
        raise ValueError("data.synthetic.new_ids: the Criteo writer does not write drifting ids")
    model = SyntheticClickModel(config, seed)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f, tqdm(total=config.num_rows, desc=f"writing {path}",
                                    unit=" rows", disable=not progress) as bar:
        for lo in range(0, config.num_rows, chunk_rows):
            hi = min(lo + chunk_rows, config.num_rows)
            f.write(criteo_lines(model, lo, hi))
            bar.update(hi - lo)
    os.replace(tmp, path)
    meta = {"config": asdict(config), "seed": seed, "split": list(split),
            "split_seed": split_seed,
            "ceiling_auc": planted_ceiling(model, config.num_rows, split, split_seed)}
    text = json.dumps(meta, indent=1)
    with open(path + ".planted.json.tmp", "w") as f:
        f.write(text)
    os.replace(path + ".planted.json.tmp", path + ".planted.json")
    return json.loads(text)


def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(description="Write planted synthetic data as a Criteo TSV.")
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--out", required=True, help="the TSV file to write")
    parser.add_argument("--config", help="settings file whose data section to use")
    parser.add_argument("--seed", type=int, help="generator seed (default: data.seed)")
    args = parser.parse_args(argv or None)
    data: Dict[str, Any] = {}
    if args.config:
        with open(args.config) as f:
            data = (yaml.safe_load(f) or {}).get("data", {})
    config = SyntheticConfig(**{**data.get("synthetic", {}), "num_rows": args.rows})
    split_seed = int(data.get("seed", 0))
    meta = write_planted_criteo(config, args.out,
                                seed=split_seed if args.seed is None else args.seed,
                                split=tuple(data.get("split", (0.8, 0.1, 0.1))),
                                split_seed=split_seed)
    print(json.dumps(meta["ceiling_auc"]))


if __name__ == "__main__":
    main()
