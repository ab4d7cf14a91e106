"""Stage 2 is bit-identical for a seed and a thread count: run twice with 2 threads, and with a
busy neighbour process competing for the cores."""
import dataclasses
import subprocess
import sys

import pytest
import torch

from torchrec_mec.quantize import (
    MECConfig,
    MECQuantizer,
    quantize_table,
    quantize_tables,
    table_seed,
)

# Batches large enough (8192 x 16 floats) that CPU kernels split work across threads.
CONFIG = MECConfig(num_subspaces=4, codebook_size=64, epochs=3, samples_per_epoch=16384,
                   batch_size=8192, eval_rows=2048, seed=5)


@pytest.fixture
def busy_neighbour():
    """A process spinning on a core for the duration of the test."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield spinner
    spinner.kill()
    spinner.wait()


def planted_table(n: int = 20000, d: int = 16):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(256, d, generator=g)
    rows = centres[torch.randint(256, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    rank = torch.randperm(n, generator=g).double() + 1
    counts = (1e6 * rank.pow(-1.1) / rank.pow(-1.1).sum()).long()  # Zipf counts
    return rows, counts


def assert_bit_identical(a, b):
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.codebooks, b.codebooks)
    assert a.stats.eval_loss == b.stats.eval_loss
    assert (a.stats.epochs_run, a.stats.best_epoch) == (b.stats.epochs_run, b.stats.best_epoch)


def test_lookup_gradient_is_exact_and_repeatable(two_threads):
    """The codebook gradient of a lookup (summed over the rows choosing each codeword) equals a
    float64 sum, to the same bits on every call."""
    g = torch.Generator().manual_seed(1)
    model = MECQuantizer(16, 4, 64, encoder="none")
    with torch.no_grad():
        model.codebooks.normal_(generator=g)
    codes = torch.randint(64, (8192, 5, 4), generator=g)
    upstream = torch.randn(8192, 5, 16, generator=g)

    def gradient() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        model.lookup(codes).backward(upstream)
        return model.codebooks.grad.clone()

    expected = torch.zeros(4, 64, 4, dtype=torch.float64)
    sub = upstream.double().view(8192, 5, 4, 4)
    for m in range(4):
        expected[m].index_add_(0, codes[..., m].reshape(-1), sub[:, :, m].reshape(-1, 4))
    first = gradient()
    torch.testing.assert_close(first.double(), expected, rtol=1e-4, atol=1e-4)
    for _ in range(20):
        assert torch.equal(gradient(), first)


def test_two_runs_with_two_threads_are_bit_identical(two_threads):
    weight, counts = planted_table()
    a = quantize_table(weight, counts, CONFIG, progress=False)
    b = quantize_table(weight, counts, CONFIG, progress=False)
    assert_bit_identical(a, b)


def test_busy_neighbour_does_not_change_the_result(two_threads, busy_neighbour):
    weight, counts = planted_table()
    with_neighbour = quantize_table(weight, counts, CONFIG, progress=False)
    busy_neighbour.kill()
    busy_neighbour.wait()
    alone = quantize_table(weight, counts, CONFIG, progress=False)
    assert_bit_identical(with_neighbour, alone)


def test_the_driver_quantizes_on_one_thread_whatever_the_callers_count(two_threads, tmp_path):
    weight, counts = planted_table(n=4000)
    config = dataclasses.replace(CONFIG, epochs=1)
    driven = quantize_tables({"t": (weight, counts)}, config, str(tmp_path), min_rows=1,
                             progress=False)["t"]
    assert torch.get_num_threads() == 2  # restored
    torch.set_num_threads(1)
    reference = quantize_table(weight, counts, dataclasses.replace(
        config, seed=table_seed(config.seed, "t")), progress=False)
    assert_bit_identical(driven, reference)
