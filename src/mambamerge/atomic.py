"""All-or-nothing file writes: write to a temp file in the target folder, then rename into place."""
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Union

PathLike = Union[str, os.PathLike]


def _temp_beside(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call write(temp_path) and move the temp file to `path` (os.replace); on any error or interrupt
    the temp file is removed and `path` is untouched. The folder must exist."""
    return write_all({Path(path): write})[0]


def write_all(writers: Dict[Path, Callable[[str], None]]) -> List[Path]:
    """Several files at once: every writer fills a temp file first, and only when all succeeded are
    they renamed into place, so an interruption leaves none of them (nor a temp file) rather than a
    mix of new and old files."""
    temps: Dict[Path, str] = {}
    try:
        for path, write in writers.items():
            temps[path] = _temp_beside(path)
            write(temps[path])
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
