"""Compile rope_kernel's Triton kernels for an H100 (sm_90) on a machine without a GPU and report, per
kernel, registers, local memory (spills), shared memory and tensor-core instructions.

    python tests/sm90_compile.py          # a table, then one JSON line; exit status 1 on register
                                          # spills or more shared memory than an H100 has
    python tests/sm90_compile.py --all    # every supported (D, dtype), not only the CI subset

The launches are the real ones: rope_kernel's host code runs on meta tensors (no memory, no GPU) of
a training shape, and each kernel launch is compiled with the arguments, block sizes and options it
would get on an H100 instead of being run. TRITON_INTERPRET must be unset (the kernels must be JIT
functions, not the interpreter's), so tests/test_rope_kernel.py runs this file in a subprocess.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET=1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import rope_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
H100_SHARED = 232448  # bytes of shared memory one block may use on an H100 (227 KiB)
KERNELS = ("_rotate_kernel", "_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel",
           "_attn_bwd_dq_kernel")


def specialize(value):
    """Signature type and 16-divisibility of one argument, following the rules of Triton's launcher:
    tensors are pointers (aligned), the integer 1 and None become constants."""
    if isinstance(value, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16",
                      torch.float16: "fp16"}[value.dtype], value.data_ptr() % 16 == 0
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
        return "constexpr", False
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        return ("i32" if abs(value) < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"unexpected kernel argument {value!r}")


class Compiler:
    """Stands in for a kernel in rope_kernel: `kernel[grid](*args, **kw)` compiles instead of running."""

    def __init__(self, fn, results, tag):
        self.fn, self.results, self.tag = fn, results, tag

    def __getitem__(self, grid):
        return self.compile

    def compile(self, *args, num_warps=4, num_stages=3, enable_fp_fusion=True, **kwargs):  # Triton's defaults
        names = self.fn.arg_names
        values = dict(zip(names, args), **kwargs)
        signature, constexprs, attrs = {}, {}, {}
        for i, name in enumerate(names):
            param = self.fn.params[i]
            if param.is_constexpr:
                signature[name], constexprs[name] = "constexpr", values[name]
                continue
            signature[name], divisible = specialize(values[name])
            if signature[name] == "constexpr":
                constexprs[name] = values[name]
            elif divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
        kernel = triton.compile(ASTSource(self.fn, signature, constexprs, attrs), target=TARGET,
                                options=dict(num_warps=num_warps, num_stages=num_stages,
                                             enable_fp_fusion=enable_fp_fusion))
        blocks = {k: values[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_T") if k in values}
        self.results.append(dict(kernel=self.fn.__name__, case=self.tag, **blocks, warps=num_warps,
                                 stages=num_stages, shared=kernel.metadata.shared, **resources(kernel.asm["cubin"])))


def resources(cubin: bytes) -> dict:
    """REG and LOCAL from cuobjdump --dump-resource-usage, tensor-core and special-function op counts
    from the SASS (cuobjdump ships with the Triton wheel)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool, "--dump-sass", f.name], capture_output=True, text=True, check=True).stdout
    field = lambda key: int(re.search(rf"\b{key}:(\d+)", usage).group(1))
    count = lambda op: len(re.findall(rf"\b{op}\b", sass))
    # register spills show up as STACK (and LDL/STL instructions), not only as LOCAL
    return dict(regs=field("REG"), stack=field("STACK"), local=field("LOCAL"), spill_ops=count("LDL") + count("STL"),
                hgmma=count(r"HGMMA\.\S+"), mufu=count(r"MUFU\.\S+"))


def spills(r):
    return r["stack"] > 0 or r["local"] > 0 or r["spill_ops"] > 0


def compile_all(D, dtype, B=2, H=16, T=4096):
    """Compile every kernel for one causal training step of RoPE attention at [B, H, T, D]."""
    results = []
    tag = f"D={D} {str(dtype).removeprefix('torch.')}"
    saved = {name: getattr(rope_kernel, name) for name in KERNELS}
    try:
        for name in KERNELS:
            setattr(rope_kernel, name, Compiler(saved[name], results, tag))
        q, k, v, do = (torch.empty(B, H, T, D, dtype=dtype, device="meta") for _ in range(4))
        pos = torch.empty(B, H, T, dtype=torch.float32, device="meta")
        freq = rope_kernel.rope_inv_freq(D, 500000.0, device="meta")
        sm_scale = D ** -0.5
        o, lse = rope_kernel._attn_fwd(q, k, v, pos, pos, freq, True, sm_scale)
        rope_kernel._attn_bwd(do, q, k, v, o, lse, pos, pos, freq, True, sm_scale)
    finally:
        for name, fn in saved.items():
            setattr(rope_kernel, name, fn)
    return list({(r["kernel"], r["case"]): r for r in results}.values())  # _rotate_kernel runs twice


def main(cases):
    results = [r for D, dtype in cases for r in compile_all(D, dtype)]
    cols = ("case", "kernel", "BLOCK_M", "BLOCK_N", "BLOCK_T", "warps", "stages", "regs", "stack", "local",
            "spill_ops", "shared", "hgmma", "mufu")
    print(" ".join(f"{c:>9}" if c != "kernel" else f"{c:<24}" for c in cols))
    for r in results:
        print(" ".join(f"{str(r.get(c, '-')):>9}" if c != "kernel" else f"{r[c]:<24}" for c in cols))
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    # every head dim in bfloat16 (float16 compiles to the same code); float32 at its worst case, D = 128
    cases = [(32, torch.bfloat16), (64, torch.bfloat16), (128, torch.bfloat16), (128, torch.float32)]
    if "--all" in sys.argv:
        cases += [(D, dtype) for D in (32, 64, 128) for dtype in (torch.float16, torch.float32)
                  if (D, dtype) not in cases]
    res = main(cases)
    sys.exit(1 if any(spills(r) or r["shared"] > H100_SHARED for r in res) else 0)
