"""Compile the Triton kernels (rope_kernel.py's fused attention, repo_kernels/triton_rope.py's
rotation) for NVIDIA GPUs on a machine without one, with the launch configs
"auto" would use there, and report registers, shared memory, spills and tensor-core instructions.

    python tests/offline_compile.py sm_80 sm_86 sm_89 sm_90    # one table per architecture; exit
                                                               # status 1 on a register spill or on more
                                                               # shared memory than the arch allows a block
    python tests/offline_compile.py sm_90 --json               # ... and one JSON line at the end

The launches are the real ones: the launchers' host code runs on meta tensors (no memory, no GPU) of
a training shape in model.py's layouts, and each kernel launch is compiled with the arguments,
block sizes and options it would get on that architecture instead of being run. Covered per arch:
D 64 and 128, bfloat16 and float16, causal and non-causal (one binary: causality is a runtime
shift), the fused forward, Delta, dk/dv and dq kernels and the rotation kernel (forward; backward
with and without position gradients). Identical compiles run once; the rest run in a process pool.
TRITON_INTERPRET must be unset (tests/test_compile.py runs this file in a subprocess).
"""
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile

import torch

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET=1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import rope_kernel  # noqa: E402
from repo_kernels import triton_rope  # noqa: E402

KERNELS = ("_rotary_kernel", "_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel",
           "_attn_bwd_dq_kernel")
ATTENTION = KERNELS[1:2] + KERNELS[3:]
HOME = {name: triton_rope if name == "_rotary_kernel" else rope_kernel for name in KERNELS}  # where each is defined
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def specialize(value):
    """Signature type and 16-divisibility of one argument, following the rules of Triton's launcher:
    tensors are pointers (aligned), the integer 1 becomes a constant."""
    if isinstance(value, torch.Tensor):
        return "*" + DTYPES[value.dtype], True  # meta tensors have no address; real buffers are aligned
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        return ("i32" if abs(value) < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"unexpected kernel argument {value!r}")


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kw)` records a compile job instead of running."""

    def __init__(self, fn, jobs, tag):
        self.fn, self.jobs, self.tag = fn, jobs, tag

    def __getitem__(self, grid):
        return self.record

    def record(self, *args, num_warps=4, num_stages=3, enable_fp_fusion=True, **kwargs):  # Triton's defaults
        names = self.fn.arg_names
        values = dict(zip(names, args), **kwargs)
        signature, constexprs, attrs = {}, {}, []
        for i, name in enumerate(names):
            if self.fn.params[i].is_constexpr:
                value = values[name]
                signature[name], constexprs[name] = "constexpr", f"tl.{value.name}" if isinstance(value, tl.dtype) else value
                continue
            signature[name], divisible = specialize(values[name])
            if signature[name] == "constexpr":
                constexprs[name] = values[name]
            elif divisible:
                attrs.append(i)
        blocks = {k: values[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_T") if k in values}
        self.jobs.append(dict(kernel=self.fn.__name__, **self.tag, **blocks, warps=num_warps, stages=num_stages,
                              signature=signature, constexprs=constexprs, attrs=attrs,
                              options=dict(num_warps=num_warps, num_stages=num_stages,
                                           enable_fp_fusion=enable_fp_fusion)))


def record_jobs(arch, D, dtype, B=2, H=16, T=4096):
    """Every launch of one training step (fused and rotary backends, causal and not) at [B, H, T, D]."""
    capability = triton_rope.ARCHS[arch]
    jobs, tag = [], dict(arch=arch, case=f"D={D} {DTYPES[dtype]}")
    saved = {name: getattr(HOME[name], name) for name in KERNELS}
    saved_capability = triton_rope._capability
    try:
        for name in KERNELS:
            setattr(HOME[name], name, Recorder(saved[name], jobs, tag))
        triton_rope._capability = lambda x: capability
        # model.py's layouts: q, k, v are transposed views of [B, T, H, D]; positions [B, T, H] transposed
        q, k, v, do = (torch.empty(B, T, H, D, dtype=dtype, device="meta").transpose(1, 2) for _ in range(4))
        pos = torch.empty(B, T, H, device="meta").transpose(1, 2)
        freq = torch.empty(D // 2, dtype=torch.float64, device="meta")
        for causal in (True, False):
            o, lse = rope_kernel.attn_fwd(q, k, v, pos, pos, freq, causal, D ** -0.5)
            rope_kernel.attn_bwd(do, q, k, v, o, lse, pos, pos, freq, causal, D ** -0.5)
        qr, kr = triton_rope.rotary([q, k], [pos, pos], freq)
        for needs in ((True, True), (False, False)):  # RePo and RoPE layers
            triton_rope.rotary([do, do.contiguous()], [pos, pos], freq, ys=[qr, kr], needs=needs)
    finally:
        for name, fn in saved.items():
            setattr(HOME[name], name, fn)
        triton_rope._capability = saved_capability
    return jobs


def job_key(job):
    return json.dumps([job["arch"], job["kernel"], job["signature"], job["constexprs"], job["attrs"], job["options"]],
                      sort_keys=True, default=str)


def compile_job(job):
    """Compile one job (in a worker process) and read its resources from the cubin."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = getattr(HOME[job["kernel"]], job["kernel"])
    constexprs = {k: tl.dtype(v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
                  for k, v in job["constexprs"].items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i in job["attrs"]}
    major, minor = triton_rope.ARCHS[job["arch"]]
    kernel = triton.compile(ASTSource(fn, job["signature"], constexprs, attrs),
                            target=GPUTarget("cuda", 10 * major + minor, 32), options=job["options"])
    return dict(shared=kernel.metadata.shared, **resources(kernel.asm["cubin"]))


def resources(cubin: bytes) -> dict:
    """REG, STACK and LOCAL from cuobjdump --dump-resource-usage; spill, tensor-core (HGMMA = wgmma on
    sm_90, HMMA = mma.sync) and special-function op counts from the SASS (cuobjdump ships with Triton)."""
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
                wgmma=count(r"HGMMA\.\S+"), mma=count(r"HMMA\.\S+"), mufu=count(r"MUFU\.\S+"))


def problems(r):
    """What is wrong with one compiled kernel, or an empty list."""
    out = []
    if r["stack"] or r["local"] or r["spill_ops"]:
        out.append("register spills")
    limit = triton_rope.SHARED_LIMIT[triton_rope.ARCHS[r["arch"]]]
    if r["shared"] > limit:
        out.append(f"shared memory {r['shared']} > {limit}")
    if r["kernel"] in ATTENTION and r["wgmma"] + r["mma"] == 0:
        out.append("no tensor-core instructions")
    return out


def main(archs, workers=2):
    jobs = [job for arch in archs for D in (64, 128) for dtype in (torch.bfloat16, torch.float16)
            for job in record_jobs(arch, D, dtype)]
    unique = {}
    for job in jobs:
        unique.setdefault(job_key(job), job)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        compiled = dict(zip(unique, pool.map(compile_job, unique.values())))
    rows = []
    for key, job in unique.items():
        r = {k: v for k, v in job.items() if k not in ("signature", "constexprs", "attrs", "options")}
        if job["kernel"] == "_rotary_kernel":
            c = job["constexprs"]
            r["kernel"] += " bwd" + (" dpos" if c["NEED1"] else "") if c["BACKWARD"] else " fwd"
        rows.append(dict(r, **compiled[key]))
    cols = ("case", "kernel", "BLOCK_M", "BLOCK_N", "BLOCK_T", "warps", "stages", "regs", "stack", "local",
            "spill_ops", "shared", "wgmma", "mma", "mufu")
    for arch in archs:
        limit = triton_rope.SHARED_LIMIT[triton_rope.ARCHS[arch]]
        print(f"\n{arch} (shared memory limit {limit:,} B per block); {len(jobs)} launches recorded over all "
              f"archs, {len(unique)} distinct compiles")
        print(" ".join(f"{c:>8}" if c != "kernel" else f"{c:<28}" for c in cols))
        for r in rows:
            if r["arch"] == arch:
                print(" ".join(f"{str(r.get(c, '-')):>8}" if c != "kernel" else f"{r[c]:<28}" for c in cols)
                      + ("  <-- " + ", ".join(problems(r)) if problems(r) else ""))
    return rows


if __name__ == "__main__":
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or list(triton_rope.ARCHS)
    unknown = [a for a in names if a not in triton_rope.ARCHS]
    if unknown:
        sys.exit(f"error: unknown architecture {unknown}; choose from {', '.join(triton_rope.ARCHS)}")
    results = main(names)
    if "--json" in sys.argv:
        print(json.dumps(results))
    bad = [r for r in results if problems(r)]
    print(f"\n{len(results)} kernels compiled, {len(bad)} with problems")
    sys.exit(1 if bad else 0)
