"""All-or-nothing file writes: write to a temp file in the target folder, then rename into place.

A kill at any moment leaves either the old files or the new ones, never a mix. The names this module
writes into a folder, and the only ones it ever renames or removes there on its own:

- `.<name>.mambamerge-<pid>-<8 hex digits>.tmp`: a file being written; every commit into a folder
  first removes those of processes that no longer run (what a kill -9 leaves behind);
- `.mambamerge-commit-<pid>-<8 hex digits>.json`: the journal of several files written together
  (write_all), {file name: temp name}, written once every temp file is complete: the old files are
  removed, then the new ones renamed into place. A kill during that step leaves the journal, and the
  next write into the folder (or recover()) finishes the renames. A journal is only followed when every
  name in it is a plain file name of its own folder and every temp name is the one its writer would
  have made; any other is left alone with a warning;
- `.mambamerge.lock`: held (an exclusive fcntl.flock) while a commit runs, so that concurrent writers
  into one folder end with one complete set, or for a whole command (hold()); removed on release.

Only regular files are replaced: a symbolic link, a FIFO, a device or a folder where a file is to be
written is an OutputError (a link is not followed, so a link planted in an output folder cannot send a
write elsewhere). Files are created with the permissions the umask gives (as open() would).
"""
import fcntl
import json
import os
import re
import secrets
import stat
import time
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Set, Union

PathLike = Union[str, os.PathLike]
LOCK_NAME = ".mambamerge.lock"
WAIT_S = 10.0  # how long a commit waits for another process's lock on its folder
_TEMP = re.compile(r"\.(?P<name>.+)\.mambamerge-(?P<pid>\d+)-[0-9a-f]{8}\.tmp")
_JOURNAL = re.compile(r"\.mambamerge-commit-(?P<pid>\d+)-[0-9a-f]{8}\.json")
_MAX_JOURNAL = 1 << 16  # bytes; ours name a handful of files
_held: Set[str] = set()  # real paths of the folders this process holds for a whole command (hold())


class OutputError(ValueError):
    """An output path that mambamerge will not write; the message says why and what to do."""


def file_kind(mode: int) -> str:
    """What an lstat/stat st_mode is, in words ("a regular file", "a FIFO (named pipe)", ...)."""
    for test, what in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "a special file"


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _new_temp(folder: Path, name: str) -> Path:
    """A new empty temp file for `name` in `folder`, named as the module docstring says."""
    while True:
        temp = folder / f".{name}.mambamerge-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return temp
        except FileExistsError:
            continue


def _dead(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no process has that pid (or none could)
        return True
    except PermissionError:  # another user's process
        return False
    return False


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def check_target(path: Path) -> None:
    """An OutputError unless `path` is absent or a regular file (see the module docstring)."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there (a folder that is not one fails later)
        return
    if stat.S_ISLNK(mode):
        raise OutputError(f"{path} is a symbolic link (to {os.readlink(path)}); mambamerge does not write through "
                          f"links, which could send a write out of its folder: give the target's own path")
    if not stat.S_ISREG(mode):
        raise OutputError(f"{path} is {file_kind(mode)}, not a regular file; mambamerge only replaces regular "
                          f"files: give another file name")


def _plain_name(name) -> bool:
    """A file name of the folder itself: no separator, not . or .., and none of this module's own names."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name
            and name != LOCK_NAME and not _TEMP.fullmatch(name) and not _JOURNAL.fullmatch(name))


def _holder(lock: Path) -> str:
    """Who holds a lock, from what its holder wrote in it."""
    try:
        with open(lock, "rb") as f:
            pid, _, purpose = f.read(200).decode("utf-8", "replace").strip().partition(" ")
        return f"process {int(pid)} ({purpose})"
    except (OSError, ValueError):
        return "another process"


def _acquire(folder: Path, purpose: str, wait: float) -> int:
    """An exclusive flock on `folder`'s lock file, waiting up to `wait` seconds, else an OutputError
    naming the holder. The lock file is removed on release; a waiter that locked a removed one retries."""
    lock = folder / LOCK_NAME
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
        except OSError as err:
            raise OutputError(f"cannot lock {folder} for writing: {lock} cannot be opened ({err.strerror}); remove it "
                              f"if it is not a file mambamerge left") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise OutputError(f"{folder} is being written by {_holder(lock)}; wait until it is done, or write "
                                  f"elsewhere") from None
            time.sleep(0.02)
            continue
        held = os.fstat(fd)
        try:
            now = os.lstat(lock)
        except FileNotFoundError:
            now = None
        if now is not None and (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
            if not stat.S_ISREG(held.st_mode):
                os.close(fd)
                raise OutputError(f"cannot lock {folder} for writing: {lock} is {file_kind(held.st_mode)}; remove it")
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {purpose}\n".encode())
            return fd
        os.close(fd)


def _release(folder: Path, fd: int) -> None:
    try:
        os.unlink(folder / LOCK_NAME)  # while still held: whoever locked this file meanwhile sees it gone
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _locked(folder: Path, purpose: str) -> Iterator[None]:
    """`folder`'s lock for one commit (nothing to take when this process holds it already)."""
    if os.path.realpath(folder) in _held:
        yield
        return
    fd = _acquire(folder, purpose, WAIT_S)
    try:
        yield
    finally:
        _release(folder, fd)


@contextmanager
def hold(folder: PathLike, purpose: str) -> Iterator[Path]:
    """Hold `folder`'s lock for a whole command (`purpose` names it in the messages of others): a second
    hold() fails at once with an OutputError naming this one, and writers of other processes wait for
    it, then give up. Creates the folder; on exit removes the folders it created that are still empty."""
    folder = Path(folder)
    created = []
    for parent in (folder, *folder.parents):
        if os.path.lexists(parent):
            break
        created.append(parent)
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    try:
        fd = _acquire(folder, purpose, wait=0)
        _held.add(key)
        try:
            yield folder
        finally:
            _held.discard(key)
            _release(folder, fd)
    finally:
        for made in created:
            try:
                made.rmdir()
            except OSError:
                break


def recover(folder: PathLike) -> None:
    """Finish what killed writers left in `folder`: complete the commits whose journal is there, then
    remove the temp files of processes that no longer run."""
    folder = Path(folder)
    if folder.is_dir():
        with _locked(folder, "recovering"):
            _recover(folder)


def _recover(folder: Path) -> None:
    names = sorted(os.listdir(folder))
    for name in names:
        found = _JOURNAL.fullmatch(name)
        if found and _dead(int(found["pid"])):
            _replay(folder / name, int(found["pid"]))
    for name in names:
        found = _TEMP.fullmatch(name)
        if found and _dead(int(found["pid"])) and _is_regular(folder / name):
            (folder / name).unlink(missing_ok=True)


def _journal_moves(journal: Path, pid: int) -> Dict[str, str]:
    """The renames a journal of process `pid` asks for; a ValueError saying why it is not one of ours."""
    if not _is_regular(journal):
        raise ValueError("not a regular file")
    with open(journal, "rb") as f:
        text = f.read(_MAX_JOURNAL + 1)
    if len(text) > _MAX_JOURNAL:
        raise ValueError(f"over {_MAX_JOURNAL} bytes")
    try:
        moves = json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(moves, dict):
        raise ValueError(f"a JSON {type(moves).__name__}, not an object")
    for name, temp in moves.items():
        if not _plain_name(name):
            raise ValueError(f"it names {name!r}, not a plain file name of its folder")
        found = _TEMP.fullmatch(temp) if isinstance(temp, str) else None
        if not found or found["name"] != name or int(found["pid"]) != pid:
            raise ValueError(f"{name!r} would be replaced by {temp!r}, not a temp file of process {pid}")
    return moves


def _replay(journal: Path, pid: int) -> None:
    try:
        moves = _journal_moves(journal, pid)
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        warnings.warn(f"{journal}: left alone, it is not a commit journal mambamerge wrote ({err}); remove it if you "
                      f"did not put it there")
        return
    try:
        _move(journal.parent, moves)
        journal.unlink()
    except OSError as err:
        warnings.warn(f"{journal}: could not finish the commit it records ({err.strerror or err}); left as it is")


def _move(folder: Path, moves: Dict[str, str]) -> None:
    """Rename every temp file still there into place."""
    for name, temp in moves.items():
        if _is_regular(folder / temp):
            os.replace(folder / temp, folder / name)


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call write(temp_path) and move the temp file to `path` (os.replace); on any error or interrupt
    the temp file is removed and `path` is untouched. The folder must exist."""
    return write_all({Path(path): write})[0]


def write_all(writers: Dict[Path, Callable[[str], None]]) -> List[Path]:
    """Several files at once: every writer fills a temp file first, and only when all succeeded are
    they committed under the folder's lock (see the module docstring), so an interruption, a kill at
    any moment or a concurrent writer never leaves new files beside old ones, nor a temp file once the
    folder is written again. An OutputError, before anything is written, for a target that is not a
    regular file."""
    writers = {Path(path): write for path, write in writers.items()}
    for path in writers:
        check_target(path)
    folders = sorted({path.parent for path in writers})
    temps: Dict[Path, Path] = {}
    try:
        for path, write in writers.items():
            temps[path] = _new_temp(path.parent, path.name)
            write(str(temps[path]))
            os.chmod(temps[path], 0o666 & ~_umask())  # after the writer: some (safetensors) recreate the file 0600
        with ExitStack() as locks:
            for folder in folders:
                locks.enter_context(_locked(folder, "committing files"))
                _recover(folder)
            if len(writers) > 1 and len(folders) == 1:
                _commit(folders[0], writers, temps)
            else:
                for path in writers:
                    os.replace(temps[path], path)
                    del temps[path]
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
    return list(writers)


def _commit(folder: Path, writers, temps: Dict[Path, Path]) -> None:
    """Several files of one folder through a journal: from its rename on the new files are decided."""
    journal = folder / f".mambamerge-commit-{os.getpid()}-{secrets.token_hex(4)}.json"
    moves = {path.name: temps[path].name for path in writers}
    temps[journal] = _new_temp(folder, journal.name)
    temps[journal].write_text(json.dumps(moves))
    os.replace(temps[journal], journal)
    temps.clear()
    try:
        for path in writers:
            path.unlink(missing_ok=True)
    finally:
        _move(folder, moves)
        journal.unlink(missing_ok=True)


def write_bytes(path: PathLike, data: Union[str, bytes]) -> Path:
    """Atomically write text (UTF-8) or bytes to `path`."""
    return write_files(Path(path).parent, {Path(path).name: data})[0]


def write_files(folder: PathLike, files: Dict[str, Union[str, bytes]]) -> List[Path]:
    """Write {name: text or bytes} into `folder`, all or nothing (see write_all)."""
    def writer(data):
        payload = data.encode("utf-8") if isinstance(data, str) else data
        return lambda tmp: Path(tmp).write_bytes(payload)

    return write_all({Path(folder) / name: writer(data) for name, data in files.items()})
