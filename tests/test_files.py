"""Every file the zoo writes is atomic and never written through a link; a run directory has one writer."""

import ast
import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from common import DiskFull
from pyrossl import files
from pyrossl.errors import CheckpointError, WriteError

PACKAGE = Path(__file__).resolve().parents[1]
SOURCES = sorted([*PACKAGE.glob("pyrossl/**/*.py"), *PACKAGE.glob("models/*.py"), *PACKAGE.glob("guides/*.py")])

# calls that write a file they are given by name (or, Path.write_text, are called on)
WRITERS = {"savefig", "savetxt", "save", "savez", "write_text", "write_bytes", "imsave", "dump"}
# calls that create, replace or link files in their own way: only files.py may make them
RAW_FILE_OPERATIONS = {"mkstemp", "NamedTemporaryFile", "fdopen", "symlink_to", "hardlink_to", "copyfile", "rename"}
OF_OS_OR_SHUTIL = {
    "replace",
    "copy",
    "copy2",
    "move",
    "link",
    "symlink",
}  # (str.replace, dict.copy are no file operations)


def _callee(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _writes(tree: ast.AST) -> list[tuple[int, str]]:
    """The write calls of a module that do not go through ``atomic_write_bytes``: a writer is fine only
    when it writes to the file object the helper hands its callback (a parameter of a lambda or of a
    function defined in the module, ``lambda f: fig.savefig(f)``)."""
    found = []

    def visit(node, handles):
        if isinstance(node, (ast.Lambda, ast.FunctionDef)):
            handles = handles | {a.arg for a in node.args.args}
        if isinstance(node, ast.Call):
            name = _callee(node)
            owner = node.func.value if isinstance(node.func, ast.Attribute) else None
            if name in WRITERS and not any(isinstance(a, ast.Name) and a.id in handles for a in node.args):
                found.append((node.lineno, name))
            elif name == "open":  # open, gzip.open, os.open (its flags read as '?'), Image.open...
                mode = (
                    node.args[1]
                    if len(node.args) > 1
                    else next((k.value for k in node.keywords if k.arg == "mode"), None)
                )
                text = "r" if mode is None else mode.value if isinstance(mode, ast.Constant) else "?"
                if not isinstance(text, str) or set(text) & set("wax+?"):
                    found.append((node.lineno, f"open(..., {text!r})"))
            elif name in RAW_FILE_OPERATIONS or (
                name in OF_OS_OR_SHUTIL and isinstance(owner, ast.Name) and owner.id in ("os", "shutil")
            ):
                found.append((node.lineno, name))
        for child in ast.iter_child_nodes(node):
            visit(child, handles)

    visit(tree, frozenset())
    return found


def test_every_write_of_the_package_goes_through_the_atomic_helper():
    offenders = []
    for path in SOURCES:
        if path.name == "files.py":
            continue
        for line, what in _writes(ast.parse(path.read_text())):
            offenders.append(f"{path.relative_to(PACKAGE)}:{line}: {what}")
    assert not offenders, "\n".join(offenders)
    # the scan sees the writes it is meant to see
    assert _writes(
        ast.parse("fig.savefig('a.png')\nnp.savetxt(p, t)\nopen(p, 'a')\nos.replace(a, b)\ntorch.save(x, p)")
    ) == [(1, "savefig"), (2, "savetxt"), (3, "open(..., 'a')"), (4, "replace"), (5, "save")]
    assert (
        _writes(
            ast.parse(
                "files.atomic_write_bytes(p, lambda f: fig.savefig(f))\nopen(p)\nopen(p, 'rb')\n's'.replace('a', 'b')"
            )
        )
        == []
    )


def test_a_write_that_fails_keeps_the_previous_content_and_says_so_in_one_line(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    files.atomic_save({"v": 1}, path)

    real = files._fdopen
    for room in (0, 100, 5000):  # torch's zip writer hides the errno in a RuntimeError: it is found again
        monkeypatch.setattr(files, "_fdopen", lambda fd, mode, room=room: DiskFull(real(fd, mode), room))
        with pytest.raises(WriteError, match=rf"^cannot write {path} \(the disk is full\)$") as info:
            files.atomic_save({"w": torch.zeros(10_000)}, path)
        assert info.value.errno == errno.ENOSPC
    monkeypatch.setattr(files, "_fdopen", real)
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left
    gone = tmp_path / "gone" / "sub"
    gone.parent.mkdir()
    gone.parent.chmod(0o500)
    try:
        if os.access(gone.parent, os.W_OK):  # root writes anywhere: the folder is removed instead
            gone.parent.chmod(0o700)
            gone.parent.rmdir()
            gone.parent.write_text("a file where a folder should be")
        with pytest.raises(WriteError, match=f"^cannot write {gone / 't.txt'} "):
            files.atomic_write_text(gone / "t.txt", "x")
    finally:
        if gone.parent.is_dir():
            gone.parent.chmod(0o700)


def test_written_files_get_the_mode_of_an_ordinary_file_and_tables_round_trip(tmp_path):
    files.write_table(tmp_path / "t.txt", np.arange(6).reshape(2, 3), "%d")
    assert np.loadtxt(tmp_path / "t.txt", dtype=int).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == 0o666 & ~files._UMASK


def test_nothing_is_written_through_a_symbolic_link(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    run = tmp_path / "run"
    (run / "figures").mkdir(parents=True)
    (run / "figures" / "loss.png").symlink_to(outside)
    with pytest.raises(CheckpointError, match="loss.png is a symbolic link"):
        files.atomic_write_text(run / "figures" / "loss.png", "x")
    (run / "linked").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(CheckpointError, match="linked is a symbolic link"):
        files.atomic_write_text(run / "linked" / "outside.txt", "x")
    assert outside.read_text() == "keep me"


def test_a_run_directory_has_one_writer_and_a_dead_writers_lock_is_gone(tmp_path):
    first = files.RunLock(tmp_path, "pyrossl train").acquire()
    with pytest.raises(
        CheckpointError, match=rf"^{tmp_path} is in use by pid {os.getpid()} on .* \(pyrossl train, since .*\): wait"
    ):
        files.RunLock(tmp_path, "pyrossl report").acquire()
    first.release()
    with files.RunLock(tmp_path, "pyrossl report"):  # released: the next writer takes it
        pass
    # a holder that died (here: a child process killed while holding it) leaves no lock behind
    pid = os.fork()
    if pid == 0:
        files.RunLock(tmp_path, "child").acquire()
        os.kill(os.getpid(), 9)
    os.waitpid(pid, 0)
    files.RunLock(tmp_path, "after the kill").acquire().release()
    (tmp_path / files.LOCK).unlink()
    (tmp_path / files.LOCK).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        files.RunLock(tmp_path, "pyrossl train").acquire()
    assert not (tmp_path / "elsewhere").exists()
