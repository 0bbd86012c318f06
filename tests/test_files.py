"""files.py: outputs whole or not at all, checked before slow work, normal modes, no silent replacement."""

import errno
import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from llmdrop import files
from llmdrop.errors import LlmdropError
from llmdrop.files import OutputExistsError, atomic_dir, atomic_file, check_output, sweep_partials, write_json


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_file_writes_whole_with_normal_mode(tmp_path, umask022):
    with atomic_file(tmp_path / "x.gguf") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".x.gguf.partial-{os.getpid()}-") and not tmp.exists()
        tmp.write_text("data")
    assert (tmp_path / "x.gguf").read_text() == "data"
    assert _mode(tmp_path / "x.gguf") == 0o644  # O15
    assert [p.name for p in tmp_path.iterdir()] == ["x.gguf"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_writers_leave_nothing_on_failure(tmp_path, exc):
    with pytest.raises(exc), atomic_file(tmp_path / "f") as tmp:
        tmp.write_text("half")
        raise exc()
    with pytest.raises(exc), atomic_dir(tmp_path / "d") as tmp:
        (tmp / "w").write_text("half")
        raise exc()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_normal_modes(tmp_path, umask022):
    with atomic_dir(tmp_path / "out") as tmp:
        private = tmp / "model.safetensors"
        private.write_text("w")
        private.chmod(0o600)  # what transformers' safetensors writer and mkstemp leave
        (tmp / "sub").mkdir(mode=0o700)
    assert _mode(tmp_path / "out") == 0o755 and _mode(tmp_path / "out" / "sub") == 0o755  # O15
    assert _mode(tmp_path / "out" / "model.safetensors") == 0o644


def test_concurrent_file_writers_do_not_replace_each_other(tmp_path):
    """X12: the second writer to finish gets an error, its temporary file is removed, the first result is kept."""
    out = tmp_path / "x.gguf"
    with pytest.raises(OutputExistsError, match="appeared while this job ran"), atomic_file(out) as slow:
        slow.write_text("f16")
        with atomic_file(out) as fast:
            fast.write_text("f32")
    assert out.read_text() == "f32"
    assert [p.name for p in tmp_path.iterdir()] == ["x.gguf"]
    with atomic_file(out, overwrite=True) as tmp:  # asked for: replaced
        tmp.write_text("f16")
    assert out.read_text() == "f16"


def test_concurrent_dir_writers_do_not_replace_each_other(tmp_path):
    """O12: two drops to one -o without --overwrite: the second to finish refuses and leaves the first."""
    out = tmp_path / "o"
    with pytest.raises(OutputExistsError), atomic_dir(out) as slow:
        (slow / "mlp").write_text("2")
        with atomic_dir(out) as fast:
            (fast / "attn").write_text("2")
    assert [p.name for p in out.iterdir()] == ["attn"]
    assert [p.name for p in tmp_path.iterdir()] == ["o"]
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "mlp").write_text("2")
    assert [p.name for p in out.iterdir()] == ["mlp"] and [p.name for p in tmp_path.iterdir()] == ["o"]


def test_check_output_refuses_existing_and_wrong_kind(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("")
    with pytest.raises(LlmdropError, match="already exists; choose another output or pass overwrite"):
        check_output(tmp_path / "d")
    with pytest.raises(LlmdropError, match="is a file, not a directory"):
        check_output(tmp_path / "f", overwrite=True, kind="dir")
    with pytest.raises(LlmdropError, match="is a directory, not a file"):  # X6, O13
        check_output(tmp_path / "d", overwrite=True, kind="file")
    with pytest.raises(LlmdropError, match="is a file, not a directory") as err:  # O7: -o FILE/sub
        check_output(tmp_path / "f" / "sub")
    assert err.value.render(lambda p: {"output": "-o"}.get(p, "--" + p)).endswith("choose another -o")
    assert check_output(tmp_path / "d", overwrite=True) == tmp_path / "d"


def test_check_output_creates_missing_parents(tmp_path):
    """X7: export -o new/sub/x.gguf creates the parents (as drop does) instead of failing at the end."""
    out = check_output(tmp_path / "new" / "sub" / "x.gguf", kind="file")
    assert out.parent.is_dir() and list(out.parent.iterdir()) == []


def test_unwritable_parent_fails_before_any_work(tmp_path, monkeypatch):
    """O5, O6, O14, X8: probed with a real file (root ignores mode bits; an immutable directory refuses even root)."""
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    with pytest.raises(LlmdropError, match=r"cannot write in .* \(Operation not permitted\)"):
        check_output(tmp_path / "out")
    with pytest.raises(LlmdropError, match="cannot write in"):
        write_json(tmp_path / "s.json", {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode-555 directory")
def test_unwritable_parent_by_mode(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(LlmdropError, match="cannot write in"):
        check_output(ro / "out")


def test_stale_partials_of_dead_processes_are_swept(tmp_path):
    """O11: SIGKILL leaves a hidden partial; the next writer of the same name removes it, a live writer's stays."""
    dead = tmp_path / f".out.partial-{_dead_pid()}-abcd"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 100)
    dead_file = tmp_path / f".out.partial-{_dead_pid()}-efgh"
    dead_file.write_text("half")
    live = tmp_path / f".out.partial-{os.getppid()}-ijkl"
    live.mkdir()
    other = tmp_path / f".other.partial-{_dead_pid()}-mnop"
    other.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not dead.exists() and not dead_file.exists()
    assert live.exists() and other.exists()  # someone else's live job, and another output's partial
    assert sweep_partials(tmp_path / "other") == [other]


def test_write_json_modes_and_errors(tmp_path, umask022, monkeypatch):
    write_json(tmp_path / "s.json", {"a": 1})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 1}
    assert _mode(tmp_path / "s.json") == 0o644  # O15: mkstemp made it 0600
    write_json(tmp_path / "s.json", {"a": 2})  # replacing stays the default (study shards share files)
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 2}
    (tmp_path / "dir").mkdir()
    with pytest.raises(LlmdropError, match="is a directory, not a file"):  # O13: no IsADirectoryError traceback
        write_json(tmp_path / "dir", {})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(LlmdropError, match=r"could not write .*No space left on device"):
        write_json(tmp_path / "s.json", {"a": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "s.json"]  # no hidden temp JSON left
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 2}


def test_disk_full_inside_the_block_is_one_sentence(tmp_path):
    with pytest.raises(LlmdropError, match="No space left"), atomic_dir(tmp_path / "o"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_braces_in_paths_survive_parameter_rendering(tmp_path):
    (tmp_path / "{n}").mkdir()
    with pytest.raises(LlmdropError) as err:
        check_output(tmp_path / "{n}")
    assert "{n} already exists" in str(err.value)


def _old_output(path):
    path.mkdir()
    (path / "keep.txt").write_text("old")


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_replaces_whole(tmp_path, monkeypatch, exchange):
    """Both ways of replacing (an atomic exchange, or moving aside first where the OS has none) leave only the new."""
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False, raising=False)
    elif files._renameat2() is None:
        pytest.skip("no renameat2 here")
    out = tmp_path / "o"
    _old_output(out)
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["o"]


def test_interrupt_between_the_two_renames_keeps_the_old_output(tmp_path, monkeypatch):
    """R1: Ctrl-C / SIGTERM after the old output was moved aside and before the new one is in place."""
    monkeypatch.setattr(files, "_exchange", lambda a, b: False, raising=False)
    out = tmp_path / "o"
    _old_output(out)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_rename(src, dst)

    with pytest.raises(KeyboardInterrupt), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        monkeypatch.setattr(files.os, "rename", rename)
    monkeypatch.setattr(files.os, "rename", real_rename)
    assert (out / "keep.txt").read_text() == "old" and [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


@pytest.fixture
def python_signal_handlers():
    """Python's own SIGINT / SIGTERM handlers, as a fresh `llmdrop` process has them (a library an earlier test loaded
    into this process may have set its own: seen once in CI); the previous ones back afterwards."""
    wanted = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    previous = {signum: signal.signal(signum, handler) for signum, handler in wanted.items()}
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, set(wanted))  # and delivered, not blocked
    yield
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    for signum, handler in previous.items():
        if handler is not None:  # None: set outside Python, cannot be put back from here
            signal.signal(signum, handler)


def test_a_signal_during_the_swap_waits_until_it_is_done(tmp_path, monkeypatch, python_signal_handlers):
    """R1: a SIGINT that arrives between the renames raises its KeyboardInterrupt after both, with the new output."""
    monkeypatch.setattr(files, "_exchange", lambda a, b: False, raising=False)
    out = tmp_path / "o"
    _old_output(out)
    real_rename = os.rename

    def rename(src, dst):
        real_rename(src, dst)
        signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        monkeypatch.setattr(files.os, "rename", rename)
    monkeypatch.setattr(files.os, "rename", real_rename)
    assert [p.name for p in out.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["o"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_stash_of_a_dead_overwrite_is_restored_not_swept(tmp_path):
    """R1: a writer killed between its renames left the old output only in its stash; the next writer puts it back."""
    out = tmp_path / "o"
    stash = tmp_path / f".o.partial-{_dead_pid()}-old-abcd1234"
    _old_output(stash)
    assert sweep_partials(out) == []
    assert (out / "keep.txt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["o"]
    stash = tmp_path / f".o.partial-{_dead_pid()}-old-efgh5678"  # the new output made it: the stash is stale
    _old_output(stash)
    assert sweep_partials(out) == [stash] and [p.name for p in tmp_path.iterdir()] == ["o"]
    _old_output(tmp_path / f".p.partial-{_dead_pid()}-old-abcd1234")
    with pytest.raises(OutputExistsError, match="already exists"):  # a job about to write there sees it is back
        check_output(tmp_path / "p")
    assert (tmp_path / "p" / "keep.txt").read_text() == "old"


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_a_dangling_symlink_output_is_refused_before_any_work(tmp_path, kind):
    """R3: exists() is False for a dangling link, which was refused only at the end as 'another writer'."""
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputExistsError, match="dangling symbolic link .*pass overwrite"):
        check_output(link, kind=kind)
    writer = atomic_dir if kind == "dir" else atomic_file
    with writer(link, overwrite=True) as tmp:  # asked for: the link is replaced
        (tmp / "x").write_text("new") if kind == "dir" else tmp.write_text("new")
    assert not link.is_symlink() and (link.is_dir() if kind == "dir" else link.read_text() == "new")


def test_overwrite_replaces_a_live_symlink_and_leaves_its_target(tmp_path):
    """R4: the link becomes the output; what it pointed at stays as it was."""
    real = tmp_path / "real"
    _old_output(real)
    (tmp_path / "out").symlink_to(real)
    with atomic_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert not (tmp_path / "out").is_symlink() and [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
    assert [p.name for p in real.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real"]


def _safetensors_full():
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("make", [_safetensors_full, lambda: OSError("Not enough free space to write 113246208 bytes "
                                                                    "after offset 1784544")], ids=["safetensors", "gguf"])
def test_writers_that_report_a_full_disk_their_own_way(tmp_path, make):
    """R6, R7: safetensors' SafetensorError and gguf's OSError without errno are the one sentence too."""
    for writer in (atomic_dir, atomic_file):
        with pytest.raises(LlmdropError, match=r"could not write .*(No space left on device|Not enough free space).*; "
                                               "free some space or choose another output"), writer(tmp_path / "o") as tmp:
            (tmp / "w").write_text("half") if writer is atomic_dir else tmp.write_text("half")
            raise make()
        assert list(tmp_path.iterdir()) == []


def test_other_writer_errors_stay_as_they_are(tmp_path):
    from safetensors import SafetensorError

    for err in (SafetensorError("header too large"), OSError("something else"), OSError(errno.EACCES, "denied"),
                ValueError("No space left on device")):
        with pytest.raises(type(err)), atomic_dir(tmp_path / "o"):
            raise err
    assert list(tmp_path.iterdir()) == []


def test_files_needs_no_safetensors():
    """files.py is imported by `llmdrop --help`: the full-disk check matches safetensors' error by name."""
    code = "import sys, llmdrop.files; print('safetensors' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
