"""All-or-nothing file writes: write to a temp file in the target folder, then rename into place.

A kill at any moment leaves either the old files or the new ones, never a mix:

- temp files are named `.<name>.<pid>.<random>.tmp`; every write into a folder first removes those of
  processes that no longer run (what a kill -9 leaves behind);
- several files written together (write_all) are committed through a journal `.commit.<pid>.<random>.json`
  naming their temp files, written once every temp file is complete: the old files are removed, then
  the new ones renamed into place. A kill during that step leaves the journal, and the next write into
  the folder (or recover()) finishes the renames, so old and new files are never seen side by side.

Files are created with the permissions the umask gives (as open() would), not mkstemp's 0600.
"""
import json
import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

PathLike = Union[str, os.PathLike]
_OWNED = re.compile(r"^\..*\.(\d+)\.[^.]+\.(tmp|json)$")  # .<name>.<pid>.<random>.tmp / .commit.<pid>.<random>.json


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _temp_beside(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_owner(path: Path) -> bool:
    match = _OWNED.match(path.name)
    return bool(match) and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1)))


def recover(folder: PathLike) -> None:
    """Finish what killed writers left in `folder`: complete the commits whose journal is there, then
    remove the temp files of processes that no longer run."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for journal in sorted(folder.glob(".commit.*.json")):
        if _dead_owner(journal):
            _finish(folder, json.loads(journal.read_text()), journal)
    for leftover in folder.glob(".*.tmp"):
        if _dead_owner(leftover):
            leftover.unlink(missing_ok=True)


def _finish(folder: Path, moves: Dict[str, str], journal: Optional[Path]) -> None:
    """Rename every temp file still there into place, then drop the journal."""
    for name, tmp in moves.items():
        if (folder / tmp).exists():
            os.replace(folder / tmp, folder / name)
    if journal is not None:
        journal.unlink(missing_ok=True)


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call write(temp_path) and move the temp file to `path` (os.replace); on any error or interrupt
    the temp file is removed and `path` is untouched. The folder must exist."""
    return write_all({Path(path): write})[0]


def write_all(writers: Dict[Path, Callable[[str], None]]) -> List[Path]:
    """Several files at once: every writer fills a temp file first, and only when all succeeded are
    they committed (see the module docstring), so an interruption or a kill at any moment never leaves
    new files beside old ones, nor a temp file once the folder is written again."""
    writers = {Path(path): write for path, write in writers.items()}
    folders = {path.parent for path in writers}
    for folder in folders:
        recover(folder)
    temps: Dict[Path, str] = {}
    try:
        for path, write in writers.items():
            temps[path] = _temp_beside(path)
            write(temps[path])
            os.chmod(temps[path], 0o666 & ~_umask())  # after the writer: some (safetensors) recreate the file 0600
        journal = None
        if len(writers) > 1 and len(folders) == 1:
            folder = next(iter(folders))
            journal = folder / f".commit.{os.getpid()}.{secrets.token_hex(4)}.json"
            moves = {path.name: Path(tmp).name for path, tmp in temps.items()}
            journal_tmp = _temp_beside(journal)
            Path(journal_tmp).write_text(json.dumps(moves))
            os.replace(journal_tmp, journal)  # from here on the new files are decided
            temps.clear()
            try:
                for path in writers:
                    path.unlink(missing_ok=True)
            finally:
                _finish(folder, moves, journal)
        else:
            for path in writers:
                os.replace(temps.pop(path), path)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
    return list(writers)


def write_bytes(path: PathLike, data: Union[str, bytes]) -> Path:
    """Atomically write text (UTF-8) or bytes to `path`."""
    return write_files(Path(path).parent, {Path(path).name: data})[0]


def write_files(folder: PathLike, files: Dict[str, Union[str, bytes]]) -> List[Path]:
    """Write {name: text or bytes} into `folder`, all or nothing (see write_all)."""
    def writer(data):
        payload = data.encode("utf-8") if isinstance(data, str) else data
        return lambda tmp: Path(tmp).write_bytes(payload)

    return write_all({Path(folder) / name: writer(data) for name, data in files.items()})
