"""
A train.py run's files and how they are kept safe: its checkpoint (ckpt.pt, or ckpt_fsdp/ with
FSDP2), verified byte for byte when read; the lock that keeps a second run out of a busy out_dir;
the refusal to start over a previous run; the log lines a resumed run keeps; and the SIGTERM /
SIGINT handling that turns a preemption into a checkpoint. train.py calls these; c is its TrainConfig.

    python -c "from infra import checkpoint; print(checkpoint.read_checkpoint('out/ckpt.pt')['meta']['iter_num'])"
"""
import errno
import fcntl
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import sys
import threading
import zipfile
from contextlib import contextmanager
from dataclasses import asdict

import torch
import torch.distributed as dist

from infra.files import append_line, atomic_open, atomic_write, link_or_copy, make_dirs, remove, replace_dir, writing


class TrainError(Exception):
    """A problem with the run's input (config, data, out_dir, checkpoint): reported without a traceback."""


class StopRequested(Exception):
    """Raised by train.train_step between micro-steps when a stop signal came: the step is abandoned
    (its partial gradients dropped, nothing updated), so the checkpoint holds the state before it."""

    def __init__(self, signum, done, of):
        super().__init__(f"{signal.Signals(signum).name} after {done} of {of} micro-steps")
        self.signum, self.done, self.of = signum, done, of


class Stopped(TrainError):
    """SIGTERM or SIGINT stopped the run after a checkpoint; code is the exit status (128 + signal)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


RUN_FILES = ("ckpt.pt", "ckpt_fsdp", "ckpt_fsdp.old", "log.jsonl", "train_config.json", "hf", "hf.old")


LOCK = "train.lock"  # held by the run that uses out_dir (see out_dir_lock)


def save(c, raw, optimizer, rank, device, **meta):
    """Checkpoint the run at meta's iter_num (config, RNG state and the given meta recorded with it);
    returns its path."""
    meta = dict(config=asdict(c), model_config=asdict(raw.config), **meta,
                rng=dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None))
    return save_checkpoint(c, raw, optimizer, meta, rank)


def save_checkpoint(c, raw, optimizer, meta, rank):
    if c.fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        final = os.path.join(c.out_dir, "ckpt_fsdp")
        tmp = final + ".tmp"
        if rank == 0:
            remove(tmp)
        dist.barrier()
        msd, osd = get_state_dict(raw, optimizer)
        with writing(final, cleanup=tmp if rank == 0 else None):
            dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=tmp)
            digests = shard_digests(tmp, rank)
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, digests)
            if rank == 0:  # the shards' digests go into trainer_state.pt, which its zip CRCs protect
                meta = dict(meta, sha256=dict(sorted(kv for part in parts for kv in part.items())))
                with atomic_open(os.path.join(tmp, "trainer_state.pt")) as f:
                    torch.save(meta, f)
                replace_dir(tmp, final)
                keep(c, final, meta["iter_num"])
        dist.barrier()
        return final
    final = os.path.join(c.out_dir, "ckpt.pt")
    if rank == 0:
        with atomic_open(final) as f:  # a crash mid-write leaves the previous checkpoint intact
            torch.save({"model": raw.state_dict(), "optimizer": optimizer.state_dict(), "meta": meta}, f)
        keep(c, final, meta["iter_num"])
    return final


KEPT = re.compile(r"(ckpt-\d{7}\.pt|ckpt_fsdp-\d{7})")  # the names keep() gives; only these are pruned


def keep(c, final, it):
    """With keep_ckpts = N > 1, the checkpoint just written is also kept as ckpt-<iter>.pt (or
    ckpt_fsdp-<iter>/) by hard links (no second copy; a copy where the filesystem has none), and
    only the N newest such are kept. The next checkpoint replaces ckpt.pt, not them: to go back,
    copy one to ckpt.pt (ckpt_fsdp/) and resume."""
    if c.keep_ckpts <= 1:
        return
    stem, ext = os.path.splitext(os.path.basename(final))
    name = os.path.join(c.out_dir, f"{stem}-{it:07d}{ext}")
    remove(name)
    with writing(name, kept=f"{final} is written; only its kept copy is missing"):
        link_or_copy(final, name)
    kept = sorted(n for n in os.listdir(c.out_dir) if KEPT.fullmatch(n) and n.startswith(stem + "-"))
    for old in kept[:-c.keep_ckpts]:
        remove(os.path.join(c.out_dir, old))


def run_files(out_dir) -> list:
    """RUN_FILES and the checkpoints keep() kept: what --overwrite=true deletes."""
    kept = [n for n in os.listdir(out_dir) if KEPT.fullmatch(n)] if os.path.isdir(out_dir) else []
    return list(RUN_FILES) + sorted(kept)


def check_resume(saved: dict, resumed: dict, keys, world=1):
    """A resume continues the same run, so the keys that fix it must keep the checkpoint's values:
    the model's shape, the data and its seed, block_size (the windows the data is cut into) and
    batch_size x gradient_accumulation_steps (the samples per step, which place the data position and
    give the log's token counter its meaning). saved: the checkpoint's config; resumed: the config
    the command resolves to (presets and --key=value applied, accumulation resolved)."""
    changed = [k for k in keys if k in saved and resumed.get(k) != saved[k]]
    if changed:
        was = ", ".join(f"{k}={saved[k]!r} (this command: {resumed.get(k)!r})" for k in changed)
        raise TrainError(f"cannot change {changed} when resuming: the checkpoint has {was}, and these keys fix the "
                         "model's shape, the data windows or the samples per step. Drop them to continue the run "
                         "as it was, or start a new run in another --out_dir")
    steps = saved.get("gradient_accumulation_steps", 0)
    if steps and steps % world:  # the same global batch cannot be split evenly over this many processes
        fits = [n for n in range(1, steps + 1) if steps % n == 0]
        raise TrainError(f"this run takes {steps} micro-steps per step (gradient_accumulation_steps, fixed on "
                         f"resume), which {world} processes cannot share evenly: resume it on {fits} process(es)")


def shard_digests(folder, rank) -> dict:
    """{file name: sha256} of the files of a just-written DCP checkpoint that this rank hashes: its
    own shards (FileSystemWriter names them __<rank>_<n>.distcp), still in this node's page cache;
    rank 0 also every other file (.metadata). Every rank hashes at once, so the time a checkpoint
    takes does not grow with the number of ranks (rank 0 alone would read the whole checkpoint)."""
    mine = []
    for name in sorted(os.listdir(folder)):
        owner = name[2:].split("_", 1)[0] if name.startswith("__") and name.endswith(".distcp") else "0"
        if (owner if owner.isdigit() else "0") == str(rank):
            mine.append(name)
    return {name: sha256(os.path.join(folder, name)) for name in mine}


def checkpoint_path(out_dir):
    for name in ("ckpt.pt", "ckpt_fsdp", "ckpt_fsdp.old"):  # .old: a crash between the two renames
        if os.path.exists(os.path.join(out_dir, name)):
            return os.path.join(out_dir, name)
    return None


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_zip(path):
    """torch.save writes a zip whose every record (tensor data, the pickled meta) carries a CRC-32,
    which torch.load never checks: flipped bytes would load silently."""
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
    if bad is not None:
        raise ValueError(f"its record {bad} fails its CRC-32 check: bytes were flipped or overwritten")


META_KEYS = ("config", "model_config", "iter_num", "samples_seen", "best_val_loss", "tokenizer", "rng")


def check_meta(meta):
    missing = [k for k in META_KEYS if k not in meta] if isinstance(meta, dict) else list(META_KEYS)
    if missing:
        raise ValueError(f"its trainer state lacks {missing}: not a train.py checkpoint")


def read_checkpoint(path, verify=True) -> dict:
    """{"meta": ...} (+ "model", "optimizer" for ckpt.pt); tensors only, so weights_only loading works.
    verify: check every byte first (ckpt.pt: the zip's CRC-32s; ckpt_fsdp/: the sha256 of each shard)."""
    try:
        if os.path.isdir(path):
            state_file = os.path.join(path, "trainer_state.pt")
            if verify:
                check_zip(state_file)
            meta = torch.load(state_file, map_location="cpu", weights_only=True)
            if verify:  # checkpoints written before the digests were recorded have none to check
                for name, digest in meta.get("sha256", {}).items():
                    file = os.path.join(path, name)
                    if not os.path.exists(file):
                        raise ValueError(f"its file {name} is missing")
                    if sha256(file) != digest:
                        raise ValueError(f"{file} does not match the sha256 recorded when it was written")
            check_meta(meta)
            return {"meta": meta}
        if verify:
            check_zip(path)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: ranks share pages
        if not {"model", "optimizer", "meta"} <= set(state):
            raise ValueError(f"keys {sorted(state)} instead of model/optimizer/meta")
        check_meta(state["meta"])
        return state
    except Exception as e:  # noqa: BLE001 - any failure to read means the same thing here
        raise TrainError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e}). It was not "
                         "modified; restore a copy, or start a new run with another out_dir") from None


@contextmanager
def out_dir_lock(out_dir, take=True):
    """Hold an exclusive lock on out_dir/train.lock while the run lives (rank 0 takes it), so a second
    run into the same out_dir is refused instead of interleaving logs and overwriting files. The
    kernel releases the lock when the process ends, kill -9 included; a normal exit also removes the
    file, and the out_dir itself if this run created it and wrote nothing into it. On a filesystem
    without flock (some Lustre and NFS mounts): an exclusively created out_dir/train.lock.held
    instead (exclusive_lock)."""
    if not take:
        yield
        return
    created = not os.path.exists(out_dir)
    make_dirs(out_dir)
    path = os.path.join(out_dir, LOCK)
    while True:
        with writing(path, kept="nothing was written"):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process that is still starting"
            os.close(fd)
            raise TrainError(f"{out_dir} is in use by another train.py run ({holder}; lock file {path}): wait for "
                             "it to finish or stop it, or choose another --out_dir") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in NO_FLOCK:
                raise
            fd = None
            break
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the holder removed the file while we opened it: lock the new one
    if fd is None:
        remove(path)  # the flock attempt's empty file
        fd, path = exclusive_lock(out_dir), os.path.join(out_dir, HELD)
    else:
        os.ftruncate(fd, 0)
        os.write(fd, holder_line().encode())
    try:
        yield
    finally:
        remove(path)
        os.close(fd)
        if created:
            try:
                os.rmdir(out_dir)  # only if empty: a run refused before it wrote anything leaves nothing
            except OSError:
                pass


HELD = LOCK + ".held"  # the lock without flock: exists while a run lives
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def holder_line() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    return f"pid {os.getpid()} on {socket.gethostname()}" + (f", slurm job {job}" if job else "") + "\n"


def exclusive_lock(out_dir) -> int:
    """The lock file created with O_EXCL (no flock on this filesystem). The kernel cannot release it
    for a killed run, so one left behind is taken over when it names a process of this host that
    no longer exists, or this Slurm job (a requeued job keeps its id); any other is refused."""
    path = os.path.join(out_dir, HELD)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, holder_line().encode())
            return fd
        except OSError as e:
            if not isinstance(e, FileExistsError):
                with writing(path, kept="nothing was written"):  # the one-line error naming the file
                    raise
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    holder = f.read(200).strip()
            except FileNotFoundError:
                continue  # its run just ended
            if not left_behind(holder):
                raise TrainError(f"{out_dir} is in use by another train.py run ({holder or 'a process still starting'}; "
                                 f"lock file {path}; this filesystem has no flock, so a run killed with kill -9 "
                                 "leaves the file behind: delete it if no run is alive), or choose another --out_dir"
                                 ) from None
            remove(path)
    raise TrainError(f"could not take the lock {path}: another run keeps taking it; choose another --out_dir")


def left_behind(holder: str) -> bool:
    m = re.fullmatch(r"pid (\d+) on (\S+?)(?:, slurm job (\S+))?", holder)
    if m is None:
        return False
    pid, host, job = int(m.group(1)), m.group(2), m.group(3)
    if job is not None and job == os.environ.get("SLURM_JOB_ID"):
        return True
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# what a run writes before its first checkpoint (and the temporaries of a write cut short): a
# restart with --init_from=auto that finds no checkpoint may start over them
BEFORE_FIRST_CHECKPOINT = ("log.jsonl", "train_config.json") + tuple(f"{name}.tmp" for name in RUN_FILES)


def auto_init_from(init_from, out_dir):
    """--init_from=auto resumes when out_dir holds a checkpoint and otherwise starts from scratch;
    auto:<HF dir> starts from that checkpoint instead. A cluster's requeue or a torchrun restart can
    so rerun the very command that started the run. Returns (init_from to use, whether it was auto)."""
    if init_from != "auto" and not init_from.startswith("auto:"):
        return init_from, False
    return ("resume" if checkpoint_path(out_dir) else init_from[5:] or "scratch"), True


def check_out_dir(c, restart=False):
    """A new run may only start in an empty (or missing) out_dir, unless overwrite=True; restart
    (init_from=auto without a checkpoint): or in one that holds only what a run writes before its
    first checkpoint (an earlier attempt of this run that was stopped before it got that far)."""
    entries = sorted(set(os.listdir(c.out_dir)) - {LOCK, HELD}) if os.path.isdir(c.out_dir) else []
    if restart:
        entries = [e for e in entries if e not in BEFORE_FIRST_CHECKPOINT]
    if entries and not c.overwrite:
        ckpt = checkpoint_path(c.out_dir)
        what = f"a run's checkpoint ({ckpt}); continue it with --init_from=resume" if ckpt else \
            f"{', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''} but no checkpoint to resume from"
        raise TrainError(f"{c.out_dir} already holds {what}, or choose another --out_dir, or pass --overwrite=true "
                         f"to delete its run files ({', '.join(RUN_FILES)}) and start anew; nothing was changed")


def read_log(path, start) -> list:
    """The lines of log.jsonl that belong to the run up to its checkpoint at iteration `start`. A last
    line cut short (a kill during the write) is dropped; any other line that is not a log record is
    an error naming it, rather than a resume that silently loses or keeps the wrong records."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    keep = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and isinstance(record.get("iter"), int)
        except json.JSONDecodeError:
            ok = False
        if not ok and n == len(lines):
            print(f"note: {path} ends in an incomplete line (the run was killed while writing it); dropped it")
        elif not ok:
            raise TrainError(f"{path}, line {n}, is not a log record ({line[:80]!r}); delete that line and resume again")
        elif logged_before(record, start):
            keep.append(line + "\n")
    return keep


def logged_before(record, start) -> bool:
    """Whether a log record belongs to the run up to its checkpoint at iteration `start`: steps 1..start
    were done before it; the val loss at `start` is measured again when the run resumes."""
    return record["iter"] < start or (record["iter"] == start and "loss" in record)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@contextmanager
def stop_requests(master, launched):
    """While training, SIGTERM (what a cluster scheduler sends before preemption), SIGUSR1 (what Slurm
    sends ahead of the time limit with --signal=USR1@<seconds>) and SIGINT (Ctrl-C) only ask the loop
    to stop: at the next micro-step boundary it abandons the step (or, after the last micro-step,
    finishes it), writes a checkpoint and exits 128 + signal. Yields the list the handler appends the
    signal number to. A second signal stops at once (KeyboardInterrupt), except under torchrun
    (launched): its agent passes every signal it handles on to the workers (SIGUSR1 only when given
    in --signals_to_handle), so one Ctrl-C arrives twice; it sends SIGKILL after --shutdown_timeout
    seconds (default 30). docs/cluster.md states the time a stop takes."""
    got = []

    def handler(signum, frame):
        if got and not launched:
            raise KeyboardInterrupt
        if not got and master:
            print(f"received {signal.Signals(signum).name}: stopping after this step with a checkpoint"
                  + ("" if launched else " (send it again to stop at once, without one)"), file=sys.stderr, flush=True)
        got.append(signum)

    sigs = [] if threading.current_thread() is not threading.main_thread() else \
        [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def stop_signal(got, device) -> int:
    """The signal that asked the run to stop, 0 if none; agreed by all processes (they receive it at
    slightly different times), so that all stop after the same step."""
    sig = got[0] if got else 0
    if dist.is_initialized():
        t = torch.tensor([sig], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        sig = int(t.item())
    return sig


def restore(c, raw, optimizer, state, device):
    """Load a verified checkpoint's model, optimizer and RNG state into this run (with fsdp: each
    process reads its shards of ckpt_fsdp/)."""
    if c.fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        msd, osd = get_state_dict(raw, optimizer)
        try:
            dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=checkpoint_path(c.out_dir))
        except Exception as e:  # noqa: BLE001
            raise TrainError(f"checkpoint {checkpoint_path(c.out_dir)} is corrupt or unreadable ({e})") from None
        set_state_dict(raw, optimizer, model_state_dict=msd, optim_state_dict=osd)
    else:
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    rng = state["meta"]["rng"]
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)


def resumed_config(out_dir, rank):
    """(checkpoint state, its run's config) for --init_from=resume; rank 0 verifies every byte first."""
    ckpt = checkpoint_path(out_dir)
    if ckpt is None:
        raise TrainError(f"--init_from=resume but {out_dir} holds no checkpoint (ckpt.pt or ckpt_fsdp/)")
    state = read_checkpoint(ckpt, verify=rank == 0)
    return state, {k: v for k, v in state["meta"]["config"].items() if k != "overwrite"}


def start_files(c, start, config: dict):
    """Rank 0, before the first step: with overwrite the earlier run's files go (others in out_dir
    stay); train_config.json is written; log.jsonl keeps only what the run logged up to `start`."""
    if c.overwrite:
        for name in run_files(c.out_dir):
            remove(os.path.join(c.out_dir, name))
    atomic_write(os.path.join(c.out_dir, "train_config.json"), json.dumps(config, indent=1))
    log_path = os.path.join(c.out_dir, "log.jsonl")
    atomic_write(log_path, "".join(read_log(log_path, start) if start else []))


def log(c, record):
    append_line(os.path.join(c.out_dir, "log.jsonl"), json.dumps(record))


@contextmanager
def guard(c, rank, distributed, resume, restart=False):
    """The run's hold on out_dir: its lock (rank 0), SIGTERM/SIGINT turned into a stop request, and,
    for a new run, the refusal of an out_dir that holds another run's files. Yields the list of
    signals received (stop_signal reads it)."""
    with out_dir_lock(c.out_dir, take=rank == 0), stop_requests(rank == 0, distributed) as signals:
        if not resume:
            check_out_dir(c, restart=restart)
        yield signals


def resume_command(out_dir, world, script) -> str:
    script = os.path.relpath(os.path.abspath(script))
    if world == 1:
        launcher = "python"
    elif int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world:
        launcher = f"torchrun --standalone --nproc_per_node={world}"
    else:
        launcher = "torchrun <this run's launcher options>"
    return f"{launcher} {shlex.quote(script)} --init_from=resume --out_dir={shlex.quote(out_dir)}"


def stopped(sig, it, path, command, master) -> Stopped:
    msg = f"stopped by {signal.Signals(sig).name} after iteration {it}; checkpoint {path}. Resume with:\n    {command}"
    if master:
        print(msg, flush=True)
    return Stopped(msg, 128 + sig)


def diverged(it, error, last_ckpt, resumed, out_dir) -> TrainError:
    """The error for non-finite loss or gradients at step `it`, naming the checkpoint to go back to."""
    kept = f"the last good checkpoint is {last_ckpt[1]} (iteration {last_ckpt[0]})" if last_ckpt else \
        (f"the checkpoint this run resumed from, {checkpoint_path(out_dir)}, is untouched" if resumed
         else "no checkpoint had been written yet")
    return TrainError(f"non-finite values at iteration {it} ({error}); stopped before the update; {kept}. "
                      "Lower learning_rate or raise warmup_iters, then --init_from=resume")
