"""
What backend="auto" runs on a GPU: the winners a GPU measured, and the estimate for everything else.

The candidates are the fused kernels ("triton") and the rotation kernel in front of one of SDPA's
fused backends ("rotary" + FlashAttention, cuDNN or memory-efficient). `python bench.py --what=gpu`
times each of them forward+backward at bf16 for T = 1024, 4096, 16384 (D = 128) and 4096 (D = 64),
and writes the winner per (architecture, dtype, head dim, bucket of the key length) into its
results.json ("dispatch"); `python -m repo_kernels.auto_table RESULTS.json` copies those rows into
auto_table.json next to this file, which this module reads.

Until a GPU has measured a key, "auto" takes the estimate: rotary + the SDPA backend published
benchmarks put first on that architecture. Rotation and attention separate exactly (each token's
angle only touches its own q and k), so rotary + SDPA is the vendor's attention plus two
memory-bound passes, estimated at ~0.94x SDPA without rotation forward+backward at T = 4096,
D = 128, against 0.6-0.85x for the fused Triton kernels. On Hopper (sm_90) SDPA's cuDNN backend is
reported 1.7-2.3x its default FlashAttention-2 backend on training shapes, and not faster elsewhere.
float32 never runs the fused kernels (their float32 tiles spill registers at D = 128): it always goes
to rotary + SDPA.
"""
import json
import os
import sys

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "auto_table.json")
T_BUCKETS = (2048, 8192)  # key-length buckets around the benchmark's T = 1024 | 4096 | 16384
SDPA_NAMES = ("flash", "cudnn", "efficient")
CHOICES = ("triton",) + tuple(f"rotary+{n}" for n in SDPA_NAMES)
KEY_FIELDS = ("arch", "dtype", "D", "T")


def bucket(T):
    """The key-length bucket of T: '<=2048', '<=8192' or '>8192'."""
    for edge in T_BUCKETS:
        if T <= edge:
            return f"<={edge}"
    return f">{T_BUCKETS[-1]}"


def arch_name(capability):
    return f"sm_{capability[0]}{capability[1]}"


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def load(path=TABLE):
    """{(arch, dtype, D, bucket): row} of the measured winners (empty if nothing was measured)."""
    try:
        with open(path) as f:
            rows = json.load(f)["rows"]
    except FileNotFoundError:
        return {}
    return {(r["arch"], r["dtype"], int(r["D"]), r["T"]): r for r in rows}


_MEASURED = load()


def estimate(capability):
    """The choice the estimates favour on this architecture (see the module docstring)."""
    return "rotary+cudnn" if tuple(capability)[0] == 9 else "rotary+flash"


def choose(capability, dtype, D, Tk, measured=None):
    """(choice, where it comes from) for a CUDA device of this compute capability: a measured row for
    (arch, dtype, D, bucket of Tk) if there is one, else the estimate. choice is one of CHOICES; the
    caller still checks that "triton" can run (configs compiled for the arch, no shrunken blocks)."""
    table = _MEASURED if measured is None else measured
    row = table.get((arch_name(capability), dtype_name(dtype), int(D), bucket(Tk)))
    if row is not None and row["choice"] in CHOICES:
        return row["choice"], f"measured: {row.get('measured', '?')}"
    return estimate(capability), "estimated"


def merge(results_path, table_path=TABLE):
    """Copy the dispatch rows of a `python bench.py --what=gpu` results.json (or of its speed stage) into
    the table, replacing rows of the same key; returns the rows added or replaced."""
    with open(results_path) as f:
        results = json.load(f)
    speed = results.get("stages", {}).get("speed", results)
    machine = results.get("machine", {})
    rows = (speed.get("details") or {}).get("dispatch") or []
    if not rows:
        raise ValueError(f"{results_path} holds no dispatch rows (did the speed stage run on a GPU?)")
    stamp = ", ".join(str(machine[k]) for k in ("gpu", "torch", "triton", "date") if machine.get(k))
    table = load(table_path)
    new = []
    for r in rows:
        if r["arch"] == "cpu" or r["choice"] not in CHOICES:
            continue
        row = dict(arch=r["arch"], dtype=r["dtype"], D=int(r["D"]), T=bucket(int(r["T"])), choice=r["choice"],
                   vs_sdpa=round(r["vs_sdpa"], 3), measured=stamp or r.get("measured", "?"))
        table[tuple(row[k] for k in KEY_FIELDS)] = row
        new.append(row)
    if not new:
        raise ValueError(f"{results_path}: no GPU rows among its {len(rows)} dispatch rows")
    tmp = f"{table_path}.tmp"
    with open(tmp, "w") as f:
        json.dump(dict(rows=sorted(table.values(), key=lambda r: tuple(str(r[k]) for k in KEY_FIELDS))), f, indent=1)
        f.write("\n")
    os.replace(tmp, table_path)
    return new


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        print("usage: python -m repo_kernels.auto_table RESULTS.json   (from python bench.py --what=gpu)", file=sys.stderr)
        sys.exit(2)
    try:
        added = merge(sys.argv[1])
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for r in added:
        print(f"{r['arch']} {r['dtype']} D={r['D']} T{r['T']}: {r['choice']} ({r['measured']})")
