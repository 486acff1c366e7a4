"""
Writing files without losing what was there (and reading JSON with errors that name the file).
Every file of a run, a dataset, a checkpoint or an evaluation is written through this module: next
to its final name (name + ".tmp"), flushed to disk, and renamed into place only when complete. A
crash, a kill or a full disk leaves the old file or the new one, never a torn one, and no
temporary file behind.

A write that fails (disk full, read-only file system, no permission, quota) raises WriteError, an
OSError whose message names the file, says what went wrong and that the previous version is intact:

    with atomic_open("out/ckpt.pt") as f:       # any writer that takes a file object
        torch.save(state, f)
    atomic_write("data/x/meta.json", text)      # str or bytes
    append_line("out/log.jsonl", json_text)     # all of the line or none of it
    copy_file("data/a/val.bin", "data/b/val.bin")
    link_or_copy("out/ckpt.pt", "out/ckpt-0001000.pt")  # a hard link where the filesystem allows
    make_dirs("out")
    replace_dir("out/hf.tmp", "out/hf")         # a directory built beside its final name
    with writing("out/ckpt_fsdp", cleanup="out/ckpt_fsdp.tmp"):
        ...                                     # any other writer (torch.distributed.checkpoint)
"""
import errno
import json
import os
import shutil
from contextlib import contextmanager

HINTS = {errno.ENOSPC: "the disk is full: free some space or write somewhere else",
         errno.EDQUOT: "the disk quota is exhausted: free some space or write somewhere else",
         errno.EROFS: "the file system is read-only: choose a writable location",
         errno.EACCES: "permission denied: choose a location you can write to",
         errno.EFBIG: "the file is larger than this file system allows"}


class WriteError(OSError):
    """A write that failed; the message names the file and says what was kept."""


def _os_error(e):
    """The OSError behind e, or None: libraries wrap the one their write callback raised (torch.save
    raises RuntimeError 'unexpected pos' with the ENOSPC OSError as its context)."""
    while isinstance(e, RuntimeError):
        e = e.__cause__ or e.__context__
    return e if isinstance(e, OSError) else None


def read_json(path) -> dict:
    """A JSON object from a file, or a ValueError naming the file, line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, not a {type(obj).__name__}")
    return obj


def remove(path):
    """Delete a file, a symlink or a directory tree; nothing if it is not there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextmanager
def writing(path, cleanup=None, kept=None):
    """Run a write of `path`: on any failure `cleanup` (its temporary file or folder) is removed, and
    an OSError, also one a library wrapped, becomes a WriteError naming `path`."""
    try:
        yield
    except BaseException as e:
        if cleanup is not None:
            remove(cleanup)
        err = None if isinstance(e, WriteError) else _os_error(e)
        if err is None:
            raise
        code = errno.errorcode.get(err.errno, "") if err.errno else ""
        hint = HINTS.get(err.errno)
        kept = kept or (f"{path} is as it was before" + (" (the temporary file was removed)" if cleanup else ""))
        raise WriteError(err.errno, f"cannot write {path}: {err.strerror or err}" + (f" [{code}]" if code else "")
                         + (f"; {hint}" if hint else "") + f". {kept}") from None


@contextmanager
def atomic_open(path, mode="wb"):
    tmp = f"{path}.tmp"
    with writing(path, cleanup=tmp):
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def atomic_write(path, data):
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def append_line(path, line: str):
    """Append line + newline with one unbuffered write; if it fails, the file is cut back to its old
    length, so a log never ends in half a record because the disk filled up."""
    data = (line + "\n").encode("utf-8")
    with writing(path, kept=f"{path} keeps its earlier lines"):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                while data:
                    data = data[os.write(fd, data):]
            except BaseException:
                try:
                    os.ftruncate(fd, start)
                except OSError:
                    pass  # not a regular file (a pipe, a device): nothing to cut back
                raise
        finally:
            os.close(fd)


def copy_file(src, dst):
    with open(src, "rb") as s, atomic_open(dst) as d:
        shutil.copyfileobj(s, d, 1 << 24)


def link_or_copy(src, dst):
    """dst as a second name of the file src (a hard link: no second copy), or an atomic copy where
    the filesystem has no hard links (or dst lies on another one). A file or a directory tree."""
    if os.path.isdir(src):
        shutil.copytree(src, dst, copy_function=link_or_copy)
        return
    try:
        os.link(src, dst)
    except OSError:
        copy_file(src, dst)


def make_dirs(path):
    with writing(path, kept="nothing was written"):
        os.makedirs(path, exist_ok=True)


def replace_dir(tmp, final):
    """Move the finished directory tmp to final. The old final is renamed to final + ".old" first and
    deleted last, so at every moment one complete copy exists under one of the two names."""
    old = final + ".old"
    with writing(final, cleanup=tmp):
        if os.path.exists(final):
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(old) and not os.path.exists(final):
                os.replace(old, final)  # put the previous version back
            raise
    shutil.rmtree(old, ignore_errors=True)
