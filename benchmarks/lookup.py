"""CPU lookup benchmark: QuantizedEmbeddingBagCollection against TorchRec / FBGEMM, same run.

Criteo-shaped tables (the 26 Criteo Kaggle categorical features, rows capped as DLRM's
``max_ind_range`` does, dim 128; the full size is 4.09 GiB of float32), Zipf-distributed ids,
1 and 20 ids per bag. Tables with at least 4096 rows are product-quantized (M=8 one-byte codes,
K=256), the small ones stay full, as MEC does. Every method runs on the same batches, and the
methods alternate within each repeat (in rotating order) so that load from other jobs hits all of
them alike; medians are printed.

Baselines:
  * forward: TorchRec's ``EmbeddingBagCollection`` (one ``nn.EmbeddingBag`` per table, what an
    unsharded model runs) and FBGEMM's CPU TBE (``SplitTableBatchedEmbeddingBagsCodegen``,
    the kernel sharded EBC runs).
  * training step (forward + backward + optimizer): the unsharded EBC with ``torch.optim.SGD``
    (it builds dense gradients, as ``nn.EmbeddingBag`` does by default), and FBGEMM's TBE with
    fused EXACT_SGD (what sharded EBC uses: the update happens inside the backward).
  * "QEBC before": the same QEBC through its FBGEMM TBE fallback (the path used when the
    compiled operator is absent), to show what the operator changed.
Ours: the QEBC through the compiled operator, trained with ``torch.optim.SGD``.

New ids (docs/new_ids.md): "QEBC + fallback" is the same QEBC where each compressed table's last
``--new-share`` of ids (20% by default) are new ids: no codes, served by a hashed fallback table
of 1% of the table's rows, with 1% of its rows promoted. The ids are the same batches (scattered
over the table, so about that share of the lookups are new ids); its ratio against the QEBC is
the cost of the fallback on the fast path, measured in the same run.

Memory: "stored" is the tables (and optimizer state: none for SGD); "peak" is the most memory
a step allocates beyond that (torch's CPU allocator, via the profiler): outputs, saved tensors,
gradients, temporaries. The upstream gradient of the pooled output is allocated once, outside.

    PYTHONPATH=. python benchmarks/lookup.py --quick     # smoke test, well under a minute
    PYTHONPATH=. python benchmarks/lookup.py             # the figures in docs/performance.md
    PYTHONPATH=. python benchmarks/lookup.py --profile   # where the QEBC's time goes (profiler)
    PYTHONPATH=. python benchmarks/lookup.py --rows-cap 400000  # smaller tables (shared machines)
"""
import argparse
import gc
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Sequence

import numpy as np
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType as OptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mec import QuantizedEmbeddingBagCollection, QuantizedEmbeddingBagConfig
from torchrec_mec.modules import ProductQuantizedTable
from torchrec_mec.ops.fast_lookup import cpu_operator_available
from torchrec_mec.quantize import promote_ids

# Rows of the 26 categorical features of the Criteo Kaggle (Display Advertising) data set.
CRITEO_KAGGLE_ROWS = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
    5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]
MiB = 2**20


@dataclass
class Setup:
    rows_cap: int
    dim: int
    batch: int
    ids_per_bag: Sequence[int]
    num_batches: int
    repeats: int
    train_repeats: int


FULL = Setup(rows_cap=1_600_000, dim=128, batch=4096, ids_per_bag=(1, 20), num_batches=6,
             repeats=15, train_repeats=7)
QUICK = Setup(rows_cap=50_000, dim=128, batch=1024, ids_per_bag=(20,), num_batches=3,
              repeats=3, train_repeats=2)


def criteo_tables(
    rows_cap: int, dim: int, num_subspaces: int = 8, codebook_size: int = 256,
    min_compressed_rows: int = 4096,
) -> List[QuantizedEmbeddingBagConfig]:
    return [
        QuantizedEmbeddingBagConfig(
            name=f"t{i}", num_embeddings=min(rows, rows_cap), embedding_dim=dim,
            feature_names=[f"f{i}"],
            num_subspaces=num_subspaces if rows >= min_compressed_rows else 1,
            codebook_size=codebook_size if rows >= min_compressed_rows else 0,
        )
        for i, rows in enumerate(CRITEO_KAGGLE_ROWS)
    ]


def with_new_ids(configs: List[QuantizedEmbeddingBagConfig], new_share: float,
                 fallback_share: float = 0.01) -> List[QuantizedEmbeddingBagConfig]:
    """The same tables, each compressed one with its last ``new_share`` of ids new: served by a
    fallback of ``fallback_share`` of its rows, with as many promotion slots."""
    out = []
    for c in configs:
        if not c.compressed:
            out.append(c)
            continue
        coded = max(1, int(round(c.num_embeddings * (1 - new_share))))
        extra = max(1, int(c.num_embeddings * fallback_share))
        out.append(QuantizedEmbeddingBagConfig(
            name=c.name, num_embeddings=c.num_embeddings, embedding_dim=c.embedding_dim,
            feature_names=c.feature_names, num_subspaces=c.num_subspaces,
            codebook_size=c.codebook_size, coded_rows=coded, fallback_rows=extra,
            promotion_slots=min(extra, c.num_embeddings - coded)))
    return out


def new_id_traffic(qebc: QuantizedEmbeddingBagCollection, batches) -> str:
    """The share of the compressed tables' lookups that read new ids, and promoted ones."""
    new = promoted = total = 0
    for kjt in batches:
        for cfg in qebc.embedding_bag_configs():
            module = qebc.embedding_bags[cfg.name]
            if not isinstance(module, ProductQuantizedTable) or module.promoted_ids is None:
                continue
            for f in cfg.feature_names:
                ids = kjt[f].values()
                total += ids.numel()
                new += int((ids >= module.coded_rows).sum())
                promoted += int(torch.isin(ids, module.promoted_ids).sum())
    return (f"QEBC + fallback: {100 * new / total:.1f}% of compressed-table lookups are new ids, "
            f"{100 * promoted / total:.1f}% promoted ones")


def zipf_ids(rng: np.random.Generator, rows: int, count: int, exponent: float = 1.05) -> np.ndarray:
    """Zipf-distributed ids over ``rows`` rows (inverse CDF of a truncated power law), with the
    popular ids scattered over the table by a multiplicative hash, as hashed ids are."""
    u = rng.random(count)
    a = 1.0 - exponent
    rank = np.floor(((rows ** a - 1.0) * u + 1.0) ** (1.0 / a)).astype(np.int64) - 1
    return (np.minimum(rank, rows - 1) * 2654435761 + 12345) % rows


def make_batches(configs, batch: int, ids_per_bag: int, count: int, seed: int):
    rng = np.random.default_rng(seed)
    keys = [f for c in configs for f in c.feature_names]
    out = []
    for _ in range(count):
        values = torch.from_numpy(np.concatenate([
            zipf_ids(rng, c.num_embeddings, batch * ids_per_bag) for c in configs
        ]))
        lengths = torch.full((len(keys) * batch,), ids_per_bag, dtype=torch.int64)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys, values, lengths)
        kjt.offsets()  # computed once here, as an input pipeline would
        out.append(kjt)
    return out


def peak_allocated(fn: Callable[[], None]) -> int:
    """Most bytes held at once by what ``fn`` allocates through torch's CPU allocator."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak


def module_bytes(module: nn.Module) -> int:
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Method:
    """A named step over batch i, with its stored bytes."""

    def __init__(self, name: str, step: Callable[[int], None], stored: int):
        self.name, self.step, self.stored = name, step, stored
        self.times: List[float] = []
        self.peak = 0


def run_interleaved(methods: List[Method], repeats: int, num_batches: int) -> None:
    for m in methods:  # warm-up, and the memory measurement on a separate, untimed step
        m.step(0)
        m.peak = peak_allocated(lambda: m.step(1 % num_batches))
    for r in range(repeats):
        for m in methods[r % len(methods):] + methods[:r % len(methods)]:  # no fixed order
            gc.collect()
            t0 = time.perf_counter()
            m.step((r + 2) % num_batches)
            m.times.append(time.perf_counter() - t0)


def report(case: str, ours: Method, baselines: List[Method], rows: List[str]) -> None:
    ours_ms = 1e3 * statistics.median(ours.times)
    for b in baselines:
        base_ms = 1e3 * statistics.median(b.times)
        rows.append(
            f"{case:<14} {b.name:<34} {base_ms:>9.1f} {ours_ms:>9.1f} {base_ms / ours_ms:>7.2f}x"
            f" {b.stored / MiB:>9.0f}+{b.peak / MiB:<6.0f} {ours.stored / MiB:>7.0f}+{ours.peak / MiB:<6.0f}"
        )


def profile_qebc(qebc: QuantizedEmbeddingBagCollection, batches, upstream: torch.Tensor) -> None:
    """torch.profiler tables of QEBC training steps, before (FBGEMM TBE path) and now."""
    opt = torch.optim.SGD(qebc.parameters(), lr=0.01)

    def before(kjt: KeyedJaggedTensor) -> torch.Tensor:
        return qebc._tbe_forward(qebc._split(kjt))

    for name, forward in [("before: FBGEMM TBE path", before),
                          ("now: compiled operator", lambda kjt: qebc(kjt).values())]:
        def steps() -> None:
            for kjt in batches:
                forward(kjt).backward(upstream)
                opt.step()
                opt.zero_grad(set_to_none=True)

        steps()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps()
        print(f"## QEBC training step, {name}: {len(batches)} steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small tables: a smoke test")
    parser.add_argument("--ids-per-bag", type=int, nargs="+", help="override the cases")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: all cores)")
    parser.add_argument("--profile", action="store_true",
                        help="only profile QEBC training steps, before and now")
    parser.add_argument("--rows-cap", type=int, help="override the rows cap of the tables")
    parser.add_argument("--new-share", type=float, default=0.2,
                        help="share of each compressed table's ids that are new in the "
                             "'QEBC + fallback' method (default 0.2)")
    args = parser.parse_args()
    setup = QUICK if args.quick else FULL
    if args.rows_cap:
        setup = Setup(**{**vars(setup), "rows_cap": args.rows_cap})
    if args.threads:
        torch.set_num_threads(args.threads)
    ids_per_bag = args.ids_per_bag or setup.ids_per_bag
    if not cpu_operator_available():
        raise SystemExit("the compiled operator is not built: pip install --no-build-isolation -e .")
    torch.manual_seed(0)
    configs = criteo_tables(setup.rows_cap, setup.dim)
    dense_bytes = sum(c.num_embeddings * c.embedding_dim * 4 for c in configs)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at start")
    print(f"# {len(configs)} Criteo-shaped tables, dim {setup.dim}, rows capped at "
          f"{setup.rows_cap:,}: {dense_bytes / 2**30:.2f} GiB as float32; "
          f"{sum(c.compressed for c in configs)} product-quantized (M=8, K=256), the rest full; "
          f"batch {setup.batch}, Zipf ids")

    if args.profile:
        qebc = QuantizedEmbeddingBagCollection(configs)
        for L in ids_per_bag:
            batches = make_batches(configs, setup.batch, L, setup.num_batches, seed=L)
            print(f"# {L} ids per bag")
            profile_qebc(qebc, batches, torch.randn(setup.batch, setup.dim * len(configs)))
        return

    # Dense tables: one FBGEMM TBE owns the weights; the EBC's parameters are views of them.
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(c.num_embeddings, c.embedding_dim, EmbeddingLocation.HOST, ComputeDevice.CPU)
         for c in configs],
        optimizer=OptimType.EXACT_SGD, learning_rate=0.01,
    )
    tbe.init_embedding_weights_uniform(-0.01, 0.01)
    plain = [EmbeddingBagConfig(name=c.name, num_embeddings=c.num_embeddings,
                                embedding_dim=c.embedding_dim, feature_names=c.feature_names)
             for c in configs]
    ebc = EmbeddingBagCollection(plain, device=torch.device("meta"))
    for c, w in zip(configs, tbe.split_embedding_weights()):
        ebc.embedding_bags[c.name].weight = nn.Parameter(w)
    ebc_opt = torch.optim.SGD(ebc.parameters(), lr=0.01)

    qebc = QuantizedEmbeddingBagCollection(configs)
    with torch.no_grad():
        for module in qebc.embedding_bags.values():
            if isinstance(module, ProductQuantizedTable):
                module.codebooks.normal_(0, 0.01)
    qebc_opt = torch.optim.SGD(qebc.parameters(), lr=0.01)
    tbe_bytes = tbe.weights_host.numel() * 4
    # The same codes and codebooks, with new ids served by fallback tables.
    fallback = QuantizedEmbeddingBagCollection(with_new_ids(configs, args.new_share))
    with torch.no_grad():
        for name, module in fallback.embedding_bags.items():
            source = qebc.embedding_bags[name]
            if isinstance(module, ProductQuantizedTable):
                module.codes[: module.coded_rows].copy_(source.codes[: module.coded_rows])
                module.codebooks.copy_(source.codebooks)
                assert module.promoted_ids is not None
                slots = module.promoted_ids.numel()
                promote_ids(fallback, name, torch.arange(module.coded_rows, module.coded_rows + slots))
            else:
                module.weight.copy_(source.weight)
    fallback_opt = torch.optim.SGD(fallback.parameters(), lr=0.01)

    rows: List[str] = []
    for L in ids_per_bag:
        batches = make_batches(configs, setup.batch, L, setup.num_batches, seed=L)
        tbe_inputs = [(kjt.values(), kjt.offsets()) for kjt in batches]
        rows.append(f"{'new ids L=' + str(L):<14} " + new_id_traffic(fallback, batches))
        upstream = torch.randn(setup.batch, sum(c.embedding_dim for c in configs))

        def no_grad(fn: Callable[[int], object]) -> Callable[[int], None]:
            def run(i: int) -> None:
                with torch.no_grad():
                    fn(i)
            return run

        def qebc_before(i: int) -> torch.Tensor:
            return qebc._tbe_forward(qebc._split(batches[i]))

        forward = [
            Method("EBC (TorchRec)", no_grad(lambda i: ebc(batches[i])), module_bytes(ebc)),
            Method("TBE (FBGEMM)", no_grad(lambda i: tbe(*tbe_inputs[i])), tbe_bytes),
            Method("QEBC before (FBGEMM TBE path)", no_grad(qebc_before), module_bytes(qebc)),
            Method("QEBC + fallback", no_grad(lambda i: fallback(batches[i])),
                   module_bytes(fallback)),
            Method("QEBC", no_grad(lambda i: qebc(batches[i])), module_bytes(qebc)),
        ]
        run_interleaved(forward, setup.repeats, setup.num_batches)
        report(f"forward L={L}", forward[-1], forward[:-1], rows)

        def ebc_step(i: int) -> None:
            ebc(batches[i]).values().backward(upstream)
            ebc_opt.step()
            ebc_opt.zero_grad(set_to_none=True)

        def tbe_step(i: int) -> None:
            tbe(*tbe_inputs[i]).backward(upstream)  # the SGD update is fused into the backward

        def qebc_before_step(i: int) -> None:
            qebc_before(i).backward(upstream)
            qebc_opt.step()
            qebc_opt.zero_grad(set_to_none=True)

        def qebc_step(i: int) -> None:
            qebc(batches[i]).values().backward(upstream)
            qebc_opt.step()
            qebc_opt.zero_grad(set_to_none=True)

        def fallback_step(i: int) -> None:
            fallback(batches[i]).values().backward(upstream)
            fallback_opt.step()
            fallback_opt.zero_grad(set_to_none=True)

        train = [
            Method("EBC + torch SGD (dense grads)", ebc_step, module_bytes(ebc)),
            Method("TBE + fused SGD (FBGEMM)", tbe_step, tbe_bytes),
            Method("QEBC before + torch SGD", qebc_before_step, module_bytes(qebc)),
            Method("QEBC + fallback + torch SGD", fallback_step, module_bytes(fallback)),
            Method("QEBC + torch SGD", qebc_step, module_bytes(qebc)),
        ]
        run_interleaved(train, setup.train_repeats, setup.num_batches)
        report(f"train L={L}", train[-1], train[:-1], rows)
        activations = upstream.numel() * 4
        ours = train[-1]
        rows.append(
            f"{'memory L=' + str(L):<14} QEBC step peak: stored {ours.stored / MiB:.0f} MiB + "
            f"step {ours.peak / MiB:.0f} MiB = {(ours.stored + ours.peak) / (ours.stored + activations):.2f}x"
            f" (stored + pooled activations {activations / MiB:.0f} MiB)"
        )
        batches.clear()  # the closures above hold the list: empty it to free this L's inputs
        tbe_inputs.clear()
        gc.collect()

    print(f"{'case':<14} {'baseline':<34} {'base ms':>9} {'QEBC ms':>9} {'ratio':>8}"
          f" {'base MiB':>16} {'QEBC MiB':>14}")
    print("\n".join(rows))
    print("# ratio = baseline time / QEBC time (above 1: QEBC faster); MiB = stored + step peak;"
          f" load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
