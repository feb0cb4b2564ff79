"""What the engine's Triton kernels compile to on an H100 (sm_90), without a GPU: Triton's ahead-of-time
compiler on the CPU, then counts of the instructions that decide a memory-bound kernel's speed.

Per case: shared memory, registers and spills (from ptxas, when Triton ships one that reads the PTX),
and per kernel the count of: byte loads from shared memory (an 8-bit operand that needs a transpose is
loaded this way: there is no 8-bit ldmatrix.trans), ldmatrix (and .trans), cp.async, mma.sync / wgmma,
IEEE divisions, and the most frequent conversions. Counts are static (instructions in the code, not
executions), so compare cases of one kernel, e.g. the fp8 decode with and without `fp8_v_fp16_tile`.

Usage: python tests/kernel_aot.py [--kernels decode,prefill,quant_rows] [--out FILE.json]
(tests/test_kernel_aot.py asserts on its decode cases)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nfsearch.runtime.kernels import paged_attention as pa
from nfsearch.runtime.kernels import quant_fp8 as qf

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = [Path(triton.__path__[0]) / "backends/nvidia/bin" / name for name in ("ptxas-blackwell", "ptxas")]
COUNTS = {"ld.shared.b8": r"ld\.shared\.b8", "ldmatrix": r"ldmatrix", "ldmatrix.trans": r"ldmatrix[.\w]*\.trans",
          "cp.async": r"cp\.async\.(?:ca|cg)", "mma.sync": r"mma\.sync", "wgmma": r"wgmma\.mma_async",
          "div.rn": r"div\.rn", "rne_magic": r"0f4B400000"}     # 1.5 x 2^23: the e4m3 rounding by hand
NOT_ALIGNED = {"B", "HKV", "NSPLIT", "SPLIT_LEN", "NP", "NSEG", "T", "W", "qk_scale"}   # runtime sizes
LLAMA3_8B = dict(PS=16, G=4, D=128)          # page size, query heads per kv head, head dim


def compile_case(fn, pointers: dict, constexprs: dict, num_warps: int, num_stages: int = 3):
    names = fn.arg_names
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n == "qk_scale" else "i32")
           for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constexprs and n not in NOT_ALIGNED and n != "qk_scale"}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))


def registers(ptx: str) -> dict:
    """ptxas -v's registers and spill bytes, from the first ptxas that reads this PTX version."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        for ptxas in PTXAS:
            if not ptxas.exists():
                continue
            info = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(path), "-o", str(path.with_suffix(".cubin"))],
                                  capture_output=True, text=True).stderr
            regs, spill = re.search(r"Used (\d+) registers", info), re.search(r"(\d+) bytes spill stores", info)
            if regs and spill:
                return {"registers": int(regs.group(1)), "spill_bytes": int(spill.group(1))}
    return {}


def report(name: str, kernel) -> dict:
    ptx = kernel.asm["ptx"]
    row = {"case": name, "shared_bytes": kernel.metadata.shared, **registers(ptx)}
    row |= {k: len(re.findall(pattern, ptx)) for k, pattern in COUNTS.items()}
    row["instructions"] = sum(1 for line in ptx.splitlines() if re.match(r"\s*(@!?%\w+\s+)?[a-z]", line))
    row["conversions"] = dict(Counter(re.findall(r"cvt\.[\w.]+", ptx)).most_common(4))
    return row


def decode_cases():
    ptrs = {"q_ptr": "*bf16", "ks_ptr": "*fp32", "vs_ptr": "*fp32", "pt_ptr": "*i32", "lens_ptr": "*i32",
            "out_ptr": "*bf16", "opart_ptr": "*fp32", "lse_ptr": "*fp32"}
    configs = [("bf16", pa.DECODE_CONFIG), ("fp8", pa.DECODE_CONFIG), ("fp8", pa.FP8_DECODE_CONFIG),
               ("fp8", replace(pa.FP8_DECODE_CONFIG, fp8_v_fp16_tile=False))]
    for cache, cfg in configs:
        is_fp8 = cache == "fp8"
        ty = "fp8e4nv" if is_fp8 else "bf16"
        const = dict(**LLAMA3_8B, GP=16, BN=cfg.block_n, DIRECT=False, STAGES=cfg.num_stages, FP8=is_fp8,
                     V16=is_fp8 and cfg.fp8_v_fp16_tile)
        name = f"decode {cache} cache {cfg.block_n}/{cfg.num_warps}/{cfg.num_stages}" + \
            (" v16" if const["V16"] else "")
        yield name, compile_case(pa._paged_decode_kernel, ptrs | {"k_ptr": f"*{ty}", "v_ptr": f"*{ty}"}, const,
                                 cfg.num_warps, cfg.num_stages)


def prefill_cases():
    ptrs = {"q_ptr": "*bf16", "ks_ptr": "*fp32", "vs_ptr": "*fp32", "pt_ptr": "*i32", "starts_ptr": "*i32",
            "lens_ptr": "*i32", "prefix_ptr": "*i32", "out_ptr": "*bf16"}
    cfg = pa.PREFILL_CONFIG
    for cache, ty in (("bf16", "bf16"), ("fp8", "fp8e4nv")):
        const = dict(**LLAMA3_8B, BM=cfg.block_m, BT=cfg.block_m // LLAMA3_8B["G"], BN=cfg.block_n, SP=8,
                     STAGES=cfg.num_stages, FP8=cache == "fp8")
        yield (f"prefill {cache} cache {cfg.block_m}/{cfg.block_n}/{cfg.num_warps}",
               compile_case(pa._paged_prefill_kernel, ptrs | {"k_ptr": f"*{ty}", "v_ptr": f"*{ty}"}, const,
                            cfg.num_warps, cfg.num_stages))


def quant_rows_cases(width: int = 14336):
    """The SiLU-mul + quantize kernel on an 8B model's FFN rows, in each layout the GPU test times."""
    ptrs = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32"}
    for cfg in (qf.RowsConfig(), qf.RowsConfig(num_warps=8), qf.RowsConfig(max_one_pass=0, chunk=4096, num_warps=4),
                qf.RowsConfig(max_one_pass=0, chunk=2048, num_warps=4)):
        one_pass, block, warps = qf.rows_layout(width, cfg)
        yield (f"silu_mul_quant {width} block {block} warps {warps}" + (" one pass" if one_pass else " two passes"),
               compile_case(qf._quant_rows_kernel, ptrs, dict(BLOCK=block, ONE_PASS=one_pass, SILU=True), warps))


KERNELS = {"decode": decode_cases, "prefill": prefill_cases, "quant_rows": quant_rows_cases}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated of: {', '.join(KERNELS)}")
    ap.add_argument("--out", help="write the rows as JSON")
    args = ap.parse_args()
    rows = [report(name, kernel) for k in args.kernels.split(",") for name, kernel in KERNELS[k]()]
    cols = ["shared_bytes", "registers", "spill_bytes", "instructions", *COUNTS]
    print("| case | " + " | ".join(cols) + " | top conversions |")
    print("|---" * (len(cols) + 2) + "|")
    for r in rows:
        conv = ", ".join(f"{k.removeprefix('cvt.')} {v}" for k, v in r["conversions"].items())
        print(f"| {r['case']} | " + " | ".join(str(r.get(c, "-")) for c in cols) + f" | {conv} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
