"""Outputs written whole or not at all: a temporary entry beside the target, then an atomic rename.

Every temporary entry is named ``.NAME.partial-<pid>-XXXX``: a process killed with SIGKILL cannot clean up after
itself, so the next writer of NAME removes the partials whose process is gone. Results get the modes of any file the
user makes (0666 / 0777 less the umask): mkstemp, mkdtemp and transformers' safetensors writer make them private.
Without ``overwrite`` the final rename never replaces an output that appeared while the job ran (two writers to one
output: the second to finish gets an error instead of silently replacing the first). With ``overwrite`` an existing
output directory is swapped with the new one in one step where the OS can (Linux renameat2 RENAME_EXCHANGE);
elsewhere it is moved aside to ``.NAME.partial-<pid>-old-XXXX`` first, and the sweep puts such a stash back when its
process died before NAME was in place again: an interrupt at any instant leaves the old output or the new one.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LlmdropError

_PARTIAL = ".partial-"
_OLD = "old-"  # the stash of an output being replaced: restored by the sweep, never just deleted, if NAME is missing
# Errors of the disk rather than of the job: worth one sentence instead of a traceback.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
# Writers that report a full disk without an errno: safetensors (Rust's "No space left on device (os error 28)" in a
# SafetensorError) and gguf ("Not enough free space to write ..." in a bare OSError).
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_NO_SPACE = ("no space left on device", "not enough free space", "disk quota exceeded")

log = logging.getLogger("llmdrop")


class OutputExistsError(LlmdropError):
    """The output appeared (or was there) and may not be replaced; callers that can reuse it catch this one."""


def literal(text: object) -> str:
    """`text` safe inside a LlmdropError message with params (which is formatted): braces doubled."""
    return str(text).replace("{", "{{").replace("}", "}}")


def _umask() -> int:
    try:  # Linux exposes it without the set-and-restore dance, which is racy between threads
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_modes(root: str | Path) -> None:
    """Give `root` (a file, or a directory and everything in it) the modes a plain ``touch`` / ``mkdir`` would."""
    root = Path(root)
    mask = _umask()
    file_mode, exec_mode = 0o666 & ~mask, 0o777 & ~mask
    if root.is_symlink():
        return
    if root.is_file():
        root.chmod(exec_mode if root.stat().st_mode & 0o100 else file_mode)
        return
    for folder, _dirs, names in os.walk(root):
        Path(folder).chmod(exec_mode)
        for name in names:
            path = Path(folder, name)
            if not path.is_symlink():
                path.chmod(exec_mode if path.stat().st_mode & 0o100 else file_mode)


def _partial_prefix(path: Path) -> str:
    return f".{path.name}{_PARTIAL}{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def sweep_partials(path: str | Path) -> list[Path]:
    """Remove the temporary entries beside `path` left by writers that no longer run (SIGKILL, power loss).

    The stash of an output that was being replaced (``-old-``) is moved back to `path` when `path` is missing: its
    writer died between moving the old output aside and putting the new one in place.
    """
    path = Path(path)
    removed = []
    prefix = f".{path.name}{_PARTIAL}"
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    stale = []
    for entry in siblings:
        if not entry.name.startswith(prefix):
            continue
        pid_text, _, rest = entry.name[len(prefix):].partition("-")
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
            continue
        stale.append((rest.startswith(_OLD), entry))
    for is_old, entry in sorted(stale, key=lambda item: item[0]):  # stashes last: a restore must not be swept
        if is_old and not (path.exists() or path.is_symlink()):
            try:
                os.rename(entry, path)
            except OSError as err:
                log.warning("could not move %s back to %s (%s); move it by hand", entry, path, err.strerror or err)
            else:
                log.warning("restored %s from %s, where a replacing writer that was stopped had left it", path, entry)
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def _wrong_kind(path: Path, kind: str) -> LlmdropError:
    want, got = ("directory", "file") if kind == "dir" else ("file", "directory")
    return LlmdropError(f"output path {literal(path)} is a {got}, not a {want}; choose another {{output}}",
                        params=["output"])


def check_output(path: str | Path, overwrite: bool = False, kind: str = "dir") -> Path:
    """Fail now, before any slow work, if `path` cannot become the output; returns it expanded.

    Refuses an existing output without `overwrite`, the wrong kind (`kind` is "dir" or "file"), a parent that is a
    file and a parent where nothing can be written (probed with a real temporary file: permission bits say nothing
    for root or an immutable directory). Creates missing parents and sweeps stale partials beside `path`.
    """
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', not {kind!r}")
    path = Path(path).expanduser()
    what = "directory" if kind == "dir" else "file"
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise LlmdropError(f"cannot write {literal(path)}: {literal(parent)} is a file, not a directory; "
                                   "choose another {output}", params=["output"])
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=_partial_prefix(path) + "probe-", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise LlmdropError(f"cannot write in {literal(path.parent)} ({literal(err.strerror or err)}); choose "
                           "another {output}", params=["output"]) from None
    sweep_partials(path)  # first: it may put back an output that an interrupted --overwrite had moved aside
    if path.exists():
        if path.is_dir() != (kind == "dir"):
            raise _wrong_kind(path, kind)
        if not overwrite:
            raise OutputExistsError(f"output {what} {literal(path)} already exists; choose another {{output}} or pass "
                                    "{overwrite}", params=["output", "overwrite"])
    elif path.is_symlink() and not overwrite:  # exists() follows links: a dangling one would be refused only at the end
        raise OutputExistsError(f"output path {literal(path)} is a dangling symbolic link (to "
                                f"{literal(os.readlink(path))}); remove it, choose another {{output}} or pass "
                                "{overwrite} to replace the link", params=["output", "overwrite"])
    return path


def _disk_error(out: Path, err: OSError | str) -> LlmdropError:
    reason = err if isinstance(err, str) else err.strerror or err
    return LlmdropError(f"could not write {literal(out)} ({literal(reason)}); free some space or choose another "
                        "{output}", params=["output"])


def _disk_reason(err: BaseException) -> str | None:
    """Why `err` is the disk's fault (a full disk, a quota, a read-only file system), or None when it is not."""
    if isinstance(err, OSError) and err.errno is not None:
        return (err.strerror or str(err)) if err.errno in _DISK_ERRNOS else None
    # Writers that are not plain file objects: match by class name, so that this module (imported by --help) needs
    # no safetensors import.
    if not isinstance(err, OSError) and type(err).__name__ != "SafetensorError":
        return None
    text = str(err)
    code = _OS_ERROR.search(text)
    if code:
        return os.strerror(int(code.group(1))) if int(code.group(1)) in _DISK_ERRNOS else None
    return text.strip() if any(words in text.lower() for words in _NO_SPACE) else None


def _exists_error(out: Path, what: str) -> OutputExistsError:
    return OutputExistsError(f"output {what} {literal(out)} appeared while this job ran (another writer?); choose another "
                             "{output} or pass {overwrite}", params=["output", "overwrite"])


def _publish_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    if not overwrite:
        # rename() would silently replace an empty directory; a non-empty one makes it fail (ENOTEMPTY / EEXIST).
        if out.exists() or out.is_symlink():
            raise _exists_error(out, "directory")
        try:
            os.rename(tmp, out)
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise _exists_error(out, "directory") from None
            raise
        return
    if not (out.is_symlink() or out.is_dir()):
        if out.exists():
            raise _wrong_kind(out, "dir")
        os.rename(tmp, out)
        return
    old, published = tmp, False
    try:
        with _signals_held():
            if not _exchange(tmp, out):  # an exchange is one step: `out` is the old output or the new one throughout
                # Moved aside first; put back on any failure here, and by the sweep if this process dies in between.
                old = out.with_name(f"{_partial_prefix(out)}{_OLD}{tmp.name[-8:]}")
                try:
                    os.rename(out, old)
                    os.rename(tmp, out)
                except BaseException:
                    if (old.exists() or old.is_symlink()) and not (out.exists() or out.is_symlink()):
                        os.rename(old, out)
                    raise
            published = True
    finally:
        if published:  # also when a signal held during the swap is raised now
            _remove(old)


@functools.cache
def _renameat2():
    """libc's renameat2, or None (not Linux, a libc before glibc 2.28)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def _exchange(a: Path, b: Path) -> bool:
    """Swap the entries `a` and `b` atomically (Linux RENAME_EXCHANGE); False where the OS or file system cannot,
    in which case nothing changed."""
    func = _renameat2()
    if func is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return func(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, so that the KeyboardInterrupt they raise lands before or after it.

    Their Python handlers are swapped for one that only notes the signal, then restored and the signal raised
    again. Masking the signals (pthread_sigmask) would not do: it masks this thread only, and in a process with
    other threads (torch's) one of those takes the signal and Python runs the handler in the main thread anyway.
    """
    names = [signal.SIGINT, signal.SIGTERM]
    if threading.current_thread() is not threading.main_thread() or any(signal.getsignal(s) is None for s in names):
        yield  # signal.signal works in the main thread only; None: a handler set outside Python cannot be restored
        return
    caught: list[int] = []
    before = {s: signal.signal(s, lambda signum, _frame: caught.append(signum)) for s in names}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


def _publish_file(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise _wrong_kind(out, "file")
    if overwrite:
        os.replace(tmp, out)
        return
    try:  # link() never replaces: the one atomic no-replace rename plain Python offers
        os.link(tmp, out)
    except FileExistsError:
        raise _exists_error(out, "file") from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if out.exists():  # a file system without hard links: check, then rename (a tiny window remains)
            raise _exists_error(out, "file") from None
        os.rename(tmp, out)
        return
    os.unlink(tmp)


@contextmanager
def _disk_full_is_a_sentence(out: Path) -> Iterator[None]:
    """A full disk (or quota) while the caller writes is the user's to fix: one sentence, not a traceback."""
    try:
        yield
    except Exception as err:
        reason = _disk_reason(err)
        if reason is None:
            raise
        raise _disk_error(out, reason) from None


def _publish(tmp: Path, out: Path, overwrite: bool, publish: Callable[[Path, Path, bool], None]) -> None:
    """Give the finished temporary its final modes and name; any OS failure there is one sentence too."""
    try:
        normal_modes(tmp)
        publish(tmp, out, overwrite)
    except LlmdropError:
        raise
    except OSError as err:
        raise _disk_error(out, err) from None


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block finishes without error.

    Any exception (KeyboardInterrupt included) removes it. Without `overwrite`, an `out` that appeared meanwhile is
    an OutputExistsError and is left as it is.
    """
    out = check_output(out, overwrite, kind="dir")
    tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(out), dir=out.parent))
    try:
        with _disk_full_is_a_sentence(out):
            yield tmp
        _publish(tmp, out, overwrite, _publish_dir)
    except BaseException:
        _remove(tmp)  # after an exchange it holds the old output, which may be a symbolic link
        raise


@contextmanager
def atomic_file(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` (not yet created) that becomes `path` only if the block succeeds.

    The block writes the file itself (any writer that takes a file name). Any exception removes it.
    """
    out = check_output(path, overwrite, kind="file")
    fd, name = tempfile.mkstemp(prefix=_partial_prefix(out), dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()  # reserve a unique name only: some writers refuse a file that already exists
    try:
        with _disk_full_is_a_sentence(out):
            yield tmp
        if not tmp.is_file():
            raise RuntimeError(f"the writer of {out} did not create its temporary file {tmp}")
        _publish(tmp, out, overwrite, _publish_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Write `text` to `path` whole or not at all."""
    with atomic_file(path, overwrite) as tmp:
        tmp.write_text(text)
    return Path(path).expanduser()


def write_json(path: str | Path, data, overwrite: bool = True) -> Path:
    """Write `data` as indented JSON, whole or not at all.

    Replacing by default: study shards write the same shared files at once and the last rename wins.
    """
    return write_text(path, json.dumps(data, indent=1) + "\n", overwrite)
