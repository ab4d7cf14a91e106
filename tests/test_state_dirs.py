"""State directories (torch.distributed.checkpoint) written from views of one flat buffer, the
way FBGEMM's TBE hands out a rank's tables: the values round-trip, and saving holds no second
copy of them."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from torchrec_mec.pipeline.state_dirs import ONE_PROCESS, load_state, save_state

REPO = Path(__file__).resolve().parents[1]


def test_views_of_one_buffer_round_trip(tmp_path):
    flat = torch.randn(40, 6)
    half = torch.randn(10, 4).to(torch.bfloat16)
    state = {"rows_a": flat[:25], "rows_b": flat[25:], "columns": flat[:, 2:5],
             "bf16_rows": half[3:7], "whole": torch.arange(5)}
    expect = {k: v.clone() for k, v in state.items()}
    save_state(str(tmp_path / "s"), state, ONE_PROCESS, "demo", {})
    loaded = {k: torch.zeros_like(v) for k, v in expect.items()}
    load_state(str(tmp_path / "s"), loaded, ONE_PROCESS, "demo")
    for key, value in expect.items():
        assert torch.equal(loaded[key], value), key
        assert torch.equal(state[key], value), key  # saving left the buffer as it was


def test_saving_views_of_a_large_buffer_adds_no_copy(tmp_path):
    """Two 128 MiB row views of one 256 MiB buffer (a rank's tables and their optimizer state
    in TBE's layout): DCP's writer alone clones both and keeps the clones until the file is
    written, +256 MiB of peak RSS; the peak may grow by much less than one view."""
    script = textwrap.dedent(f"""
        import json, torch
        from torchrec_mec.pipeline.state_dirs import ONE_PROCESS, save_state

        def status(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1]) * 1024

        flat = torch.ones(2 * 2**15, 1024)  # 256 MiB of float32, touched
        state = {{"tables": flat[:2**15], "momentum": flat[2**15:]}}
        save_state({str(tmp_path / "warm")!r}, {{"w": torch.ones(4)}}, ONE_PROCESS, "d", {{}})
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = status("VmRSS")
        save_state({str(tmp_path / "big")!r}, state, ONE_PROCESS, "d", {{}})
        print(json.dumps({{"peak_growth": status("VmHWM") - before}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    growth = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth"]
    assert growth < 48 * 2**20, f"saving grew the peak RSS by {growth / 2**20:.0f} MiB"
