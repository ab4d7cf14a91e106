"""State directories (torch.distributed.checkpoint) written from views of one flat buffer, the
way FBGEMM's TBE hands out a rank's tables, and split into row ranges: the values round-trip,
and neither saving nor loading holds a second copy of them. (Resharding of split items between
world sizes: tests/distributed/test_sharded_state.py, which saves in small items.)"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from torchrec_mec.pipeline import state_dirs
from torchrec_mec.pipeline.state_dirs import ONE_PROCESS, load_state, save_state, state_shapes

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("chunk_bytes", [64, state_dirs.SAVE_CHUNK_BYTES])
def test_views_of_one_buffer_round_trip(tmp_path, monkeypatch, chunk_bytes):
    monkeypatch.setattr(state_dirs, "SAVE_CHUNK_BYTES", chunk_bytes)  # 64: 2-row items and less
    flat = torch.randn(40, 6)
    half = torch.randn(10, 4).to(torch.bfloat16)
    state = {"rows_a": flat[:25], "rows_b": flat[25:], "columns": flat[:, 2:5],
             "bf16_rows": half[3:7], "whole": torch.arange(5)}
    expect = {k: v.clone() for k, v in state.items()}
    save_state(str(tmp_path / "s"), state, ONE_PROCESS, "demo", {})
    assert state_shapes(str(tmp_path / "s"))["rows_a"] == ((25, 6), torch.float32)
    loaded = {k: torch.zeros_like(v) for k, v in expect.items()}
    load_state(str(tmp_path / "s"), loaded, ONE_PROCESS, "demo")
    for key, value in expect.items():
        assert torch.equal(loaded[key], value), key
        assert torch.equal(state[key], value), key  # saving left the buffer as it was


def test_saving_and_loading_a_large_state_add_no_copy(tmp_path):
    """Two 128 MiB row views of one 256 MiB buffer (a rank's tables and their optimizer state
    in TBE's layout), saved in items of 4 MiB: DCP's writer alone clones both views and keeps
    the clones until the file is written (+256 MiB of peak RSS), and its reader loads an item
    whole before copying it into place (+128 MiB for a 128 MiB item); each may grow the peak
    by at most 48 MiB (measured: 16 MiB saving, 8-12 MiB loading). glibc's mmap threshold is
    fixed at 1 MiB so that freed item buffers leave the RSS at once (by default the threshold
    grows with the first freed buffer, and the heap's slack made the peak vary 32-65 MiB)."""
    script = textwrap.dedent(f"""
        import json, torch
        from torchrec_mec.pipeline import state_dirs
        from torchrec_mec.pipeline.state_dirs import ONE_PROCESS, load_state, save_state

        def status(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1]) * 1024

        def peak_growth(fn):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            before = status("VmRSS")
            fn()
            return status("VmHWM") - before

        state_dirs.SAVE_CHUNK_BYTES = 4 << 20
        flat = torch.ones(2 * 2**15, 1024)  # 256 MiB of float32, touched
        state = {{"tables": flat[:2**15], "momentum": flat[2**15:]}}
        save_state({str(tmp_path / "warm")!r}, {{"w": torch.ones(4)}}, ONE_PROCESS, "d", {{}})
        big = {str(tmp_path / "big")!r}
        save = peak_growth(lambda: save_state(big, state, ONE_PROCESS, "d", {{}}))
        flat.zero_()
        load = peak_growth(lambda: load_state(big, dict(state), ONE_PROCESS, "d", verify=False))
        print(json.dumps({{"save": save, "load": load, "ok": bool((flat == 1).all())}}))
    """)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"]
    for step in ("save", "load"):
        assert result[step] < 48 * 2**20, f"{step} grew the peak RSS by {result[step] / 2**20:.0f} MiB"
