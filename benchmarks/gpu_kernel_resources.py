"""What the Triton lookup kernels compile to on a GPU, without a GPU.

Triton's wheel ships NVIDIA's ``ptxas``, ``cuobjdump`` and ``nvdisasm``, so the kernels of
``torchrec_mec/ops/triton_lookup.py`` can be compiled for a Hopper GPU (sm_90: H100, H200) on any
machine. For each launch configuration of ``benchmarks/gpu_lookup.py`` this prints, per kernel
(forward, backward), the registers per thread, the stack and local memory (spills), the resident
warps per SM that the registers allow, the block-wide barriers (a layout change through shared
memory inside the loop shows up as two per id, and serialises the loads) and the memory
instructions in the code, by width: what the kernel is before it ever runs.

    python benchmarks/gpu_kernel_resources.py              # the issue's shape: M=8, D=128
    python benchmarks/gpu_kernel_resources.py --sm 100     # another architecture

Warps per SM: what 64K registers and the 64-warp limit allow (allocation granularity ignored).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict, Tuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torchrec_mec.ops.triton_lookup import (  # noqa: E402
    DEFAULT_LAUNCH, LAUNCH_CANDIDATES, kernel_arguments)

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
REGISTERS_PER_SM, MAX_WARPS_PER_SM = 65536, 64
# values, offsets, weights, codes, codebooks or output gradient, output or codebook gradient,
# number of bags, K: the same for both kernels.
RUNTIME_TYPES = ["*i64", "*i64", "*fp32", "*u8", "*fp32", "*fp32", "i32", "i32", "i32"]


def compile_kernel(kernel, types, constants: Dict[str, object], num_warps: int, sm: int) -> bytes:
    names = list(kernel.arg_names)
    signature = {name: types[i] if i < len(types) else "constexpr" for i, name in enumerate(names)}
    # As Triton's JIT specializes the benchmark's launch: tensors 16-byte aligned, the number of
    # bags (65,536) and K (256) multiples of 16.
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(types))}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", sm, 32),
                              options={"num_warps": num_warps})
    return compiled.asm["cubin"]


def resources(cubin: bytes) -> Tuple[Dict[str, int], Counter]:
    """Resource usage (REG, STACK, LOCAL ..., and BARRIERS: block-wide barriers in the code) and
    the count of each memory instruction."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
    try:
        usage = subprocess.run([str(TOOLS / "cuobjdump"), "--dump-resource-usage", handle.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(TOOLS / "nvdisasm"), "-c", handle.name],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(handle.name)
    found = dict((key, int(value)) for key, value in re.findall(r"(\w+):(\d+)", usage))
    found["BARRIERS"] = sass.count("BAR.SYNC")
    ops = Counter(m.group(1) for m in re.finditer(r"\b((?:LDG|STG|RED|ATOMG|LDL|STL)[\w.]*)",
                                                  sass))
    return found, ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sm", type=int, default=90, help="compute capability, e.g. 90, 100")
    parser.add_argument("--subspaces", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--default-only", action="store_true",
                        help="only the default launch configuration")
    args = parser.parse_args()
    launches = [DEFAULT_LAUNCH] if args.default_only else LAUNCH_CANDIDATES
    print(f"# sm_{args.sm}, triton {triton.__version__}: M={args.subspaces}, D={args.dim}, "
          f"K={args.codebook_size}, uint8 codes, int64 ids, SUM, unweighted")
    print(f"{'kernel':<9} {'bags':>4} {'warps':>5} {'ids/trip':>8} {'regs':>5} {'stack':>5} "
          f"{'barriers':>8} {'warps/SM':>8}  memory instructions in the code (all ids of a trip)")
    for name in ("forward", "backward"):
        for launch in launches:
            bags, warps, unroll = launch.block_bags, launch.num_warps, launch.unroll
            kernel, constants = kernel_arguments(name, args.subspaces, args.dim // args.subspaces,
                                                 False, False, launch)
            found, ops = resources(compile_kernel(kernel, RUNTIME_TYPES, constants, warps,
                                                  args.sm))
            regs = found.get("REG", 0)
            resident = min(MAX_WARPS_PER_SM,
                           (REGISTERS_PER_SM // max(regs * 32 * warps, 1)) * warps)
            print(f"{name:<9} {bags:>4} {warps:>5} {unroll:>8} {regs:>5} "
                  f"{found.get('STACK', 0):>5} {found['BARRIERS']:>8} {resident:>8}  "
                  + ", ".join(f"{op} x{count}" for op, count in sorted(ops.items())))


if __name__ == "__main__":
    main()
