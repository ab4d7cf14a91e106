"""quantize_tables on 2 gloo ranks (table-parallel) equals the single-process run."""
import os

import torch

from tests.distributed.multiprocess import run_on_ranks
from torchrec_mec.artifacts import load_artifact
from torchrec_mec.quantize import MECConfig, quantize_tables

CFG = MECConfig(num_subspaces=2, codebook_size=16, epochs=3, samples_per_epoch=2048,
                batch_size=512, eval_rows=256)
MIN_ROWS = 1000


def make_tables():
    sizes = {"t0": 2000, "t1": 2000, "t2": 2000, "t3": 1500, "small": 200}
    out = {}
    for i, (name, n) in enumerate(sizes.items()):
        g = torch.Generator().manual_seed(i)
        out[name] = (torch.randn(n, 8, generator=g), torch.randint(0, 1000, (n,), generator=g))
    return out


def _rank_main(rank: int, world_size: int, out_dir: str, result_dir: str) -> None:
    results = quantize_tables(make_tables(), CFG, out_dir, min_rows=MIN_ROWS, progress=False)
    flat = {}
    for name, res in results.items():
        if res is not None:
            flat[f"{name}.codes"], flat[f"{name}.codebooks"] = res.codes, res.codebooks
    torch.save(flat, os.path.join(result_dir, f"rank{rank}.pt"))


def test_two_ranks_equal_single_process(tmp_path):
    out_dir, result_dir = str(tmp_path / "dist"), str(tmp_path)
    run_on_ranks(_rank_main, out_dir, result_dir, world_size=2)

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as on each rank: results are per thread count
    try:
        single = quantize_tables(make_tables(), CFG, str(tmp_path / "single"),
                                 min_rows=MIN_ROWS, progress=False)
    finally:
        torch.set_num_threads(before)

    assert single["small"] is None
    for rank in range(2):
        got = torch.load(os.path.join(result_dir, f"rank{rank}.pt"))
        assert len(got) == 8  # every rank loaded all four compressed tables
        for name in ("t0", "t1", "t2", "t3"):
            assert torch.equal(got[f"{name}.codes"], single[name].codes)
            assert torch.equal(got[f"{name}.codebooks"], single[name].codebooks)
    owners = {name: load_artifact(os.path.join(out_dir, f"{name}.mec"))[1]["rank"]
              for name in ("t0", "t1", "t2", "t3")}
    # Largest first, balanced: rows 2000, 2000, 2000, 1500 -> ranks hold 4000 and 3500.
    assert sorted(owners.values()) == [0, 0, 1, 1]
    assert owners["t0"] == 0 and owners["t1"] == 1
