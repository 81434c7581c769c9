"""Where nudgefast keeps what it makes: converted models and assembled GGUF files."""
import os
import re
import socket
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: $NUDGEFAST_CACHE if set, else ~/.cache/nudgefast; created on demand."""
    configured = os.environ.get("NUDGEFAST_CACHE")
    root = Path(configured).expanduser() if configured else Path.home() / ".cache" / "nudgefast"
    root.mkdir(parents=True, exist_ok=True)
    return root


def partial_tag() -> str:
    """host.pid, put in the names of half-written files and folders so a later run can tell one
    still being written (its process alive) from one left by a killed run."""
    return f"{socket.gethostname().split('.')[0]}.{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_partials(folder: Path, prefix: str, max_age_s: float = 86400.0) -> list[Path]:
    """Delete the entries of `folder` named prefix + host.pid[-...] whose process is gone (same
    host) or, for other hosts sharing the folder, that are older than max_age_s; entries without a
    tag (an older naming) are treated like another host's. Returns what was removed."""
    import shutil
    import time

    removed = []
    host = socket.gethostname().split(".")[0]
    if not Path(folder).is_dir():
        return removed
    for entry in Path(folder).iterdir():
        if not entry.name.startswith(prefix):
            continue
        tag = re.match(r"([^.]+)\.(\d+)(?:-|$)", entry.name[len(prefix):])
        try:
            if tag and tag[1] == host:
                stale = not _pid_alive(int(tag[2]))
            else:
                stale = time.time() - entry.stat().st_mtime > max_age_s
            if stale:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                removed.append(entry)
        except FileNotFoundError:  # removed by another process at the same time
            continue
    return removed
