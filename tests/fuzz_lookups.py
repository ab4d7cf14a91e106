"""Fuzzes the compiled lookup with random KeyedJaggedTensors; run in a subprocess by
tests/test_lookup_fuzz.py, so that a crash fails that test instead of killing pytest.

Every case is a random KJT for one of four collections (SUM, MEAN, weighted, mixed pooling; uint8
and uint16 codes, full and shared tables, one with a fallback table for new ids), with int32 or
int64 ids, keys in random order, empty bags, and one of the faults below or none. Valid cases are
compared with a float64 reference (decoded tables, ``F.embedding_bag`` in float64: no library
code); invalid ones must raise a ValueError whose message this script predicts from the input
alone. Some cases call the operator directly with offsets no KJT would produce, or its backward
with corrupt saved codes.

    python -m tests.fuzz_lookups --cases 10000 --seed 0
"""
import argparse
import random
import re
import sys
import time
from collections import Counter
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mec import QuantizedEmbeddingBagCollection, QuantizedEmbeddingBagConfig
from torchrec_mec.modules import ProductQuantizedTable

from tests.qebc_testing import randomize_

FAULTS = ("none", "negative_length", "huge_length", "lengths_over", "lengths_under", "bad_id",
          "extreme_id", "bad_code", "raw_offsets", "corrupt_saved_codes")
HUGE = [2**31 - 1, -(2**31), 2**62, -(2**62), 2**63 - 1, -(2**63)]
# The operator's fallback arguments for one table of 10 rows without a fallback table.
NO_FALLBACK = ([torch.empty(0, 0)], [torch.empty(0, dtype=torch.int64)], [10])


def collection(pooling: Optional[PoolingType], weighted: bool, seed: int):
    """A QEBC with random codes and parameters; ``pooling=None`` mixes SUM and MEAN."""
    def cfg(name, rows, dim, features, m=1, k=0, pool=PoolingType.SUM, **new_ids):
        return QuantizedEmbeddingBagConfig(name=name, num_embeddings=rows, embedding_dim=dim,
                                           feature_names=features, num_subspaces=m,
                                           codebook_size=k, pooling=pooling or pool, **new_ids)
    configs = [
        cfg("pq8", 40, 8, ["a", "a2"], m=4, k=16),                       # shared, uint8 codes
        cfg("pq16", 30, 6, ["b"], m=3, k=300, pool=PoolingType.MEAN),    # uint16 codes
        cfg("full", 20, 4, ["c"]),                                        # full table
        cfg("pq_reg", 25, 16, ["d"], m=4, k=256),                        # register-sum shape
        # ids 20..31 are new: 2 of them promoted, the others read 3 fallback rows
        cfg("pq_fb", 32, 8, ["e"], m=2, k=16, coded_rows=20, fallback_rows=3, promotion_slots=4),
    ]
    qebc = randomize_(QuantizedEmbeddingBagCollection(configs, is_weighted=weighted), seed)
    fallback = qebc.embedding_bags["pq_fb"]
    fallback.promote(torch.tensor([29, 23]), fallback.codes[:2].clone())
    return qebc, configs


def code_row(module, v: int) -> Optional[int]:
    """The row of ``codes`` id ``v`` reads, or None when it reads a fallback row (plain Python)."""
    if module.fallback is None or v < module.coded_rows:
        return v
    promoted = module.promoted_ids.tolist()
    return module.coded_rows + promoted.index(v) if v in promoted else None


def decoded64(qebc) -> Dict[str, torch.Tensor]:
    """Each table as a float64 [N, D] tensor: row i = concat_m codebooks[m, codes[i, m]]."""
    out = {}
    for name, module in qebc.embedding_bags.items():
        if isinstance(module, ProductQuantizedTable):
            codes = module.codes.to(torch.int64)
            books = module.codebooks.detach().double()
            decoded = torch.cat([books[m][codes[:, m]] for m in range(books.shape[0])], dim=1)
            rows = []
            for v in range(module.num_embeddings):
                row = code_row(module, v)
                rows.append(decoded[row] if row is not None else module.fallback.detach().double()[
                    (v - module.coded_rows) % module.fallback.shape[0]])
            out[name] = torch.stack(rows)
        else:
            out[name] = module.weight.detach().double()
    return out


def reference(tables, configs, keys, values, lengths, weights, batch) -> torch.Tensor:
    """Float64 pooled output in table order (the QEBC's output layout)."""
    by_feature = {f: c for c in configs for f in c.feature_names}
    starts = [0]
    for i in range(len(keys)):
        starts.append(starts[-1] + int(lengths[i * batch:(i + 1) * batch].sum()))
    blocks = {}
    for i, key in enumerate(keys):
        cfg = by_feature[key]
        ids = values[starts[i]:starts[i + 1]].long()
        offsets = F.pad(lengths[i * batch:(i + 1) * batch].cumsum(0), (1, 0))
        w = None if weights is None else weights[starts[i]:starts[i + 1]].double()
        blocks[key] = F.embedding_bag(
            ids, tables[cfg.name], offsets, include_last_offset=True, per_sample_weights=w,
            mode="mean" if cfg.pooling == PoolingType.MEAN else "sum")
    return torch.cat([blocks[f] for c in configs for f in c.feature_names], dim=1)


def expected_error(configs, qebc, keys, values, lengths, batch) -> Optional[str]:
    """The message the collection must raise for this input, predicted from the input alone
    (offsets first, then the first feature in key order with an id outside its table, then
    the first table holding a code >= K for an id given), or None for a valid input."""
    by_feature = {f: c for c in configs for f in c.feature_names}
    n = values.numel()
    for r, length in enumerate(lengths.tolist()):
        if length < 0:
            return rf"feature '{keys[r // batch]}': bag {r % batch} has a negative length \({length}\)"
    end = 0
    for r, length in enumerate(lengths.tolist()):
        end += length
        if end > n:
            return (rf"feature '{keys[r // batch]}': its bags end at value {end} but there are "
                    rf"only {n} values")
    if end != n:
        return rf"feature '{keys[-1]}': the bags end at value {end} but there are {n} values"
    start = 0
    spans = []
    for i, key in enumerate(keys):
        size = int(lengths[i * batch:(i + 1) * batch].sum())
        spans.append((key, values[start:start + size].tolist()))
        start += size
    for key, ids in spans:
        cfg = by_feature[key]
        for v in ids:
            if v < 0 or v >= cfg.num_embeddings:
                return (rf"feature '{key}': id {v} is out of range for table '{cfg.name}' "
                        rf"with {cfg.num_embeddings} rows")
    for t, cfg in enumerate(configs):
        if not cfg.compressed:
            continue
        module = qebc.embedding_bags[cfg.name]
        codes = module.codes.to(torch.int64)
        for key, ids in spans:
            rows = [code_row(module, v) for v in ids] if by_feature[key] is cfg else []
            if any(r is not None and int(codes[r].max()) >= cfg.codebook_size for r in rows):
                return rf"table '{cfg.name}': codes hold a value >= codebook_size {cfg.codebook_size}"
    return None


def random_case(rng: random.Random, configs, fault: str):
    keys = [f for c in configs for f in c.feature_names]
    rng.shuffle(keys)
    rows = {f: c.num_embeddings for c in configs for f in c.feature_names}
    batch = rng.randint(1, 5)
    lengths = [rng.choice([0, 0, 1, 2, 3, 5]) for _ in range(len(keys) * batch)]
    values = [rng.randrange(rows[keys[r // batch]]) for r, n in enumerate(lengths) for _ in range(n)]
    if fault == "negative_length":
        r = rng.randrange(len(lengths))
        lengths[r] = -rng.randint(1, 10)
    elif fault == "huge_length":
        r = rng.randrange(len(lengths))
        lengths[r] = rng.choice([100_000, 2**31 - 1, 2**40])
        if r + 1 < len(lengths):  # a negative length right after hides it from the sum
            lengths[r + 1] = -lengths[r] + rng.randint(0, 3)
    elif fault == "lengths_over":
        lengths[rng.randrange(len(lengths))] += rng.randint(1, 4)
    elif fault == "lengths_under":
        values += [0] * rng.randint(1, 4)
    elif fault in ("bad_id", "extreme_id") and values:
        j = rng.randrange(len(values))
        start = 0
        for r, n in enumerate(lengths):  # the table of the feature that value j belongs to
            if start + n > j:
                break
            start += n
        limit = rows[keys[r // batch]]
        values[j] = rng.choice([-1, limit, limit + 7]) if fault == "bad_id" else rng.choice(HUGE)
    return keys, values, lengths, batch


def value_keys(keys: List[str], lengths: List[int], batch: int) -> List[str]:
    """The feature each value belongs to (for valid, non-negative lengths)."""
    return [keys[r // batch] for r, n in enumerate(lengths) for _ in range(max(n, 0))]


def check_raises(fn, pattern: str) -> None:
    try:
        fn()
    except ValueError as error:
        if not re.search(pattern, str(error)):
            raise AssertionError(f"expected /{pattern}/, got ValueError: {error}") from error
        return
    raise AssertionError(f"expected ValueError /{pattern}/, nothing was raised")


def raw_operator_case(rng: random.Random) -> None:
    """The operator called directly with offsets that no KJT produces."""
    codes = torch.randint(0, 8, (10, 2), dtype=torch.uint8)
    books = torch.randn(2, 8, 3)
    n = rng.randint(0, 6)
    values = torch.randint(0, 10, (n,))
    offsets = sorted(rng.randint(0, n) for _ in range(3))
    kind = rng.choice(["start", "decrease", "past_end", "short_end", "count"])
    if kind == "start":
        offsets = [rng.choice([-5, 1, 2**40])] + offsets[1:] + [n]
        pattern = r"feature 'f': offsets must start at 0"
    elif kind == "decrease":
        offsets = [0, n, max(n - rng.randint(1, 3), -3), n]
        pattern = r"feature 'f': bag 1 has a negative length"
    elif kind == "past_end":
        offsets = [0, n + rng.randint(1, 2**40), n + 2**41, n + 2**41]
        pattern = r"feature 'f': its bags end at value \d+ but there are only"
    elif kind == "short_end":
        offsets = [0, 0, 0, max(n - 1, 0)] if n else [0, 0, 0, 0]
        values = values if n else torch.tensor([1])
        pattern = r"feature 'f': the bags end at value"
    else:
        offsets = [0, n, n, n]  # 3 bags cannot be split between 2 features
        feature_tables = [0, 0]
        check_raises(lambda: torch.ops.torchrec_mec.pooled_lookup_forward(
            values, torch.tensor(offsets), None, [codes], [books], *NO_FALLBACK, feature_tables,
            [0, 0], [0, 1], False, "f\ng", "t"), r"offsets must hold num_features \* batch \+ 1")
        return
    check_raises(lambda: torch.ops.torchrec_mec.pooled_lookup_forward(
        values, torch.tensor(offsets), None, [codes], [books], *NO_FALLBACK, [0], [0], [0], False,
        "f", "t"), pattern)


def corrupt_saved_codes_case(rng: random.Random) -> None:
    """The backward called directly with saved codes that were never the forward's."""
    k = rng.choice([5, 8, 200])
    codes = torch.randint(0, k, (10, 2), dtype=torch.uint8)
    books = torch.randn(2, k, 3)
    values = torch.randint(0, 10, (4,))
    offsets = torch.tensor([0, 1, 4])
    saved = torch.full((values.numel() * 2,), rng.randint(k, 255), dtype=torch.uint8)
    check_raises(lambda: torch.ops.torchrec_mec.pooled_lookup_backward(
        torch.randn(2, 6), values, offsets, None, saved, [codes], [books], *NO_FALLBACK, [0], [0],
        [0], "f", "t"), rf"table 't': saved_codes hold a value >= its codebook_size {k}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    setups = []
    for i, (pooling, weighted) in enumerate([(PoolingType.SUM, False), (PoolingType.MEAN, False),
                                             (PoolingType.SUM, True), (None, False)]):
        qebc, configs = collection(pooling, weighted, seed=i)
        setups.append((qebc, configs, weighted, decoded64(qebc)))
    counts: Counter = Counter()
    started = time.time()
    for case in range(args.cases):
        fault = rng.choice(FAULTS)
        if fault == "raw_offsets":
            raw_operator_case(rng)
            counts["raised", fault] += 1
            continue
        if fault == "corrupt_saved_codes":
            corrupt_saved_codes_case(rng)
            counts["raised", fault] += 1
            continue
        qebc, configs, weighted, tables = setups[case % len(setups)]
        keys, values, lengths, batch = random_case(rng, configs, fault)
        big = any(abs(v) >= 2**31 for v in values)
        dtype = torch.int64 if big or rng.random() < 0.5 else torch.int32
        values_t = torch.tensor(values, dtype=dtype)
        lengths_t = torch.tensor(lengths, dtype=torch.int64)
        weights = torch.rand(len(values), dtype=torch.float32) + 0.5 if weighted else None
        # The KJT as a data loader builds it: lengths given, offsets TorchRec's cumsum.
        kjt = KeyedJaggedTensor(keys=keys, values=values_t, lengths=lengths_t, weights=weights)
        bad_code: Optional[Tuple[int, int, int]] = None
        codes = qebc.embedding_bags["pq16"].codes
        if fault == "bad_code":  # a code >= K (uint16 holds up to 65535, K is 300)
            read = [v for v, key in zip(values, value_keys(keys, lengths, batch)) if key == "b"]
            row = rng.choice(read) if read else rng.randrange(codes.shape[0])
            m = rng.randrange(codes.shape[1])
            bad_code = (row, m, int(codes[row, m]))
            codes[row, m] = rng.randint(300, 65535)
        try:
            pattern = expected_error(configs, qebc, keys, values_t, lengths_t, batch)
            if pattern is None:
                with torch.no_grad():
                    out = qebc(kjt).values().double()
                ref = reference(tables, configs, keys, values_t, lengths_t, weights, batch)
                err = (out - ref).abs().max().item() if out.numel() else 0.0
                if not err <= 1e-5 * max(1.0, ref.abs().max().item()):
                    raise AssertionError(f"case {case}: max error {err} against float64")
                counts["matched", fault] += 1
            else:
                check_raises(lambda: qebc(kjt), pattern)
                counts["raised", fault] += 1
        except AssertionError as error:
            print(f"case {case} ({fault}): keys={keys} lengths={lengths} values={values} "
                  f"dtype={dtype}: {error}", file=sys.stderr)
            return 1
        finally:
            if bad_code is not None:
                row, m, original = bad_code
                codes[row, m] = original
    for (outcome, fault), count in sorted(counts.items()):
        print(f"{outcome:<8} {fault:<20} {count}")
    print(f"fuzz: {args.cases} cases in {time.time() - started:.1f} s, all as expected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
