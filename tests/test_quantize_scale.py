"""The 10M x 64 table at default settings (heavy: run with ``-m heavy``; minutes, ~6 GiB)."""
import time

import pytest
import torch

from torchrec_mec.quantize import MECConfig, quantize_table


@pytest.mark.heavy
def test_ten_million_rows_by_64():
    n, d = 10_000_000, 64
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4096, d, generator=g)
    weight = torch.empty(n, d)
    for start in range(0, n, 1 << 20):
        end = min(n, start + (1 << 20))
        c = torch.randint(4096, (end - start,), generator=g)
        weight[start:end] = centres[c] + 0.3 * torch.randn(end - start, d, generator=g)
    rank = torch.randperm(n, generator=g).double() + 1
    counts = (1e9 * rank.pow(-1.1) / rank.pow(-1.1).sum()).long()

    started = time.perf_counter()
    res = quantize_table(weight, counts, MECConfig(), name="ten_million")
    seconds = time.perf_counter() - started
    print(f"\n10M x 64, M=4, K=256: {seconds:.0f}s wall, {res.stats.epochs_run} epochs, "
          f"relative MSE {res.stats.relative_mse:.4f}, perplexity {res.stats.perplexity}")
    assert res.codes.shape == (n, 4) and res.codes.dtype == torch.uint8
    assert res.codebooks.shape == (4, 256, 16)
    # 8 bits per 16-dim Gaussian-like subspace: rate-distortion bound 0.5, k-means PQ ~0.6.
    assert res.stats.relative_mse < 0.75
    assert min(res.stats.perplexity) > 128
