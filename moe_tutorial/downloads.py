"""Downloads and the data cache: streamed, sha256-checked, atomic (notebook 01).

Every file the course needs (corpora, tokenizer ranks, pretrained weights) is downloaded once
into one cache directory and checked against a known sha256, so a learner never trains on a
truncated or corrupt file. Writes go to a temporary file beside the destination and are renamed
only when complete: a crash or a kill never leaves a half-written file in its place.
"""

import errno
import hashlib
import os
import re
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import requests
import urllib3
from tqdm.auto import tqdm


def data_dir() -> Path:
    """The cache directory: $MOE_TUTORIAL_DATA if set, else `data/` in the repository."""
    env = os.environ.get("MOE_TUTORIAL_DATA")
    if env:
        path = Path(env).expanduser()
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"MOE_TUTORIAL_DATA={env} is a file, not a directory: point it to a "
                                     f"directory (it is created if missing) or unset it to use the default")
        return path
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").exists():  # an editable install or a checkout
        return repo / "data"
    return Path.home() / ".cache" / "moe_tutorial"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_writable_dir(directory: Path, what: str = "directory") -> Path:
    """Create `directory` if needed and prove it is writable now, before any long work is done."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{what} {directory} is a file, not a directory: choose another path")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(f"Cannot write to {what}{'' if what.endswith('=') else ' '}{directory} "
                              f"({err.strerror or err}): choose a writable directory") from None
    return directory


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def writer_tag(pid: int | None = None) -> str:
    """Who writes a temporary file: this machine's name and a process id (`host-1234`)."""
    host = re.sub(r"\W", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid() if pid is None else pid}"


def remove_stale_temporaries(dest: Path, suffix: str) -> list[Path]:
    """Delete temporary files that an interrupted write of `dest` left beside it.

    atomic_path names its temporaries `<dest>.<host>-<pid>.<random><suffix>`; one written on this
    machine by a process that has exited is a leftover of a killed download or save. Files of live
    processes, and of other machines sharing the folder (whose processes we cannot see), are left.
    """
    if os.name != "posix":  # os.kill(pid, 0) is a liveness probe on POSIX only
        return []
    host = writer_tag().rsplit("-", 1)[0]
    pattern = re.compile(re.escape(dest.name) + r"\.(\w+)-(\d+)\.[^.]+" + re.escape(suffix) + "$")
    removed = []
    for path in dest.parent.glob(f"{dest.name}.*{suffix}"):
        match = pattern.match(path.name)
        if match and match.group(1) == host and not _process_alive(int(match.group(2))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class DiskFullError(OSError):
    """The disk filled up during an atomic write; whatever `dest` held before is untouched."""


def _caused_by_full_disk(err: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain: torch.save, for one, turns it into a RuntimeError of its own."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def atomic_path(dest: Path, suffix: str = ".tmp"):
    """A temporary path beside `dest` to write to; moved onto `dest` only if the block succeeds,
    deleted otherwise, so `dest` is never left half-written. Temporaries that a killed earlier
    write of the same `dest` left behind are cleaned up first. A full disk is reported in one
    line (write through a Python file object, so that the OSError reaches this far)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest, suffix)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{dest.name}.{writer_tag()}.", suffix=suffix, dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates owner-only files
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())  # on disk before the rename makes it the real file
        os.replace(tmp, dest)
    except Exception as err:
        if not _caused_by_full_disk(err):
            raise
        before = f"the previous {dest.name} is intact" if dest.exists() else f"no {dest.name} was written"
        raise DiskFullError(f"no space left on device while writing {dest}; {before}: free some space and try "
                            f"again") from None
    finally:
        tmp.unlink(missing_ok=True)


LOCK_NAME = ".lock"


def _lock_holder(lock: Path) -> str | None:
    try:
        return lock.read_text().strip() or None
    except FileNotFoundError:
        return None


def _held_by_dead_process_here(holder: str) -> bool:
    host, _, pid = holder.rpartition("-")
    return host == writer_tag().rsplit("-", 1)[0] and pid.isdigit() and not _process_alive(int(pid))


@contextmanager
def directory_lock(directory: Path, what: str = "--out-dir"):
    """Hold `directory/.lock` while the block runs, so that two runs never write into one folder.

    The lock file names its holder (`host-pid`). A second writer is refused with one line naming
    the first; a lock left by a process of this machine that no longer runs is cleared. Re-entrant
    within one process: the CLI takes the lock and `train()` takes it again, harmlessly.
    """
    lock = Path(directory) / LOCK_NAME
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = writer_tag()
    if _lock_holder(lock) == me:  # held by this process already: the outer holder releases it
        yield lock
        return
    remove_stale_temporaries(lock, ".tmp")
    fd, candidate = tempfile.mkstemp(prefix=f"{LOCK_NAME}.{me}.", suffix=".tmp", dir=directory)
    try:
        os.write(fd, (me + "\n").encode())
        os.close(fd)
        for _ in range(2):
            try:
                os.link(candidate, lock)  # atomic: fails if a lock exists, never shows a half-written one
                break
            except FileExistsError:
                holder = _lock_holder(lock)
                if holder and not _held_by_dead_process_here(holder):
                    host, _, pid = holder.rpartition("-")
                    raise FileExistsError(
                        f"{what} {directory} is in use by another run (process {pid} on {host}): wait for it to "
                        f"finish or choose another {what}; if no such run exists, delete {lock}") from None
                lock.unlink(missing_ok=True)  # left by a process that was killed: stale
        else:
            raise FileExistsError(f"could not take {lock}: another run keeps taking it; choose another {what}")
    finally:
        os.unlink(candidate)
    try:
        yield lock
    finally:
        if _lock_holder(lock) == me:
            lock.unlink(missing_ok=True)


def download(url: str, dest: Path, sha256: str, timeout: float = 30.0, progress: bool = True,
             deadline: float | None = None, min_rate: float = 1000.0, rate_window: float = 60.0) -> Path:
    """Stream `url` to `dest`, verify its sha256, and only then move it into place.

    The bytes go to a temporary file beside `dest`; it is renamed atomically once the
    checksum matches and deleted on any failure, so `dest` is either complete or absent.
    `timeout` bounds each wait for data; a download that receives fewer than `min_rate` bytes
    per second over `rate_window` seconds has stalled and stops; `deadline` bounds the whole
    download (default: 10 minutes plus one second per 50 kB announced).
    """
    dest = Path(dest)
    ensure_writable_dir(dest.parent, "data directory")
    try:
        with atomic_path(dest, suffix=".part") as tmp:
            with open(tmp, "wb") as out, requests.get(url, stream=True, timeout=timeout) as response:
                response.raise_for_status()
                total = int(response.headers.get("content-length", 0)) or None
                limit = deadline if deadline is not None else 600.0 + (total or 0) / 50e3
                give_up_at = time.monotonic() + limit
                window_start, window_bytes = time.monotonic(), 0
                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                          disable=not progress) as bar:
                    for chunk in _chunks_as_they_arrive(response):
                        out.write(chunk)
                        bar.update(len(chunk))
                        now, window_bytes = time.monotonic(), window_bytes + len(chunk)
                        if now - window_start >= rate_window:
                            if window_bytes < min_rate * rate_window:
                                raise TimeoutError(
                                    f"Download of {url} stalled: {window_bytes:,} bytes in the last "
                                    f"{rate_window:.0f} s, under {min_rate:,.0f} bytes/s. Nothing was saved to "
                                    f"{dest}; try again later or place the file there yourself.")
                            window_start, window_bytes = now, 0
                        if now > give_up_at:
                            raise TimeoutError(
                                f"Download of {url} exceeded its {limit:.0f} s deadline after {bar.n:,} bytes: "
                                f"the server is too slow. Nothing was saved to {dest}; try again later or "
                                f"place the file there yourself.")
            actual = sha256_of(tmp)
            if actual != sha256:
                raise ValueError(
                    f"Checksum mismatch for {url}: expected sha256 {sha256}, got {actual}. "
                    f"The download is corrupt or the file changed upstream; nothing was saved to {dest}."
                )
    except (requests.RequestException, urllib3.exceptions.HTTPError) as err:  # read1 raises urllib3's own
        raise FileNotFoundError(
            f"Could not download {url} ({err.__class__.__name__}). "
            f"If you are offline, download that file elsewhere and place it at {dest} "
            f"(or set MOE_TUTORIAL_DATA to a directory that holds {dest.name})."
        ) from err
    return dest


def _chunks_as_they_arrive(response, size: int = 1 << 16):
    """The body in pieces of at most `size` bytes, each returned as soon as the socket has it
    (a plain read(size) would wait for all `size` bytes, and never check the deadline)."""
    raw = response.raw
    if not hasattr(raw, "read1"):  # urllib3 < 2.3: requests' chunking (the deadline is checked per chunk)
        yield from response.iter_content(chunk_size=size)
        return
    while chunk := raw.read1(size, decode_content=True):
        yield chunk


def fetch(url: str, filename: str, sha256: str, progress: bool = True) -> Path:
    """Return the cached, verified file `filename`, downloading it on first use."""
    path = data_dir() / filename
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, but the data cache keeps the file {filename} there: move "
                                f"that directory away (it is downloaded again) or set MOE_TUTORIAL_DATA elsewhere")
    if path.exists():
        if sha256_of(path) != sha256:
            raise ValueError(
                f"{path} exists but its sha256 is not {sha256}: the file is corrupt or a "
                f"different file. Delete it to download it again from {url}."
            )
        return path
    if os.environ.get("MOE_TUTORIAL_DATA"):
        ensure_writable_dir(path.parent, "the data directory MOE_TUTORIAL_DATA=")
    return download(url, path, sha256, progress=progress)


# --- files on the Hugging Face Hub: the sha256 it announces, recorded beside the download ---------------------------

def hub_url(repo: str, filename: str) -> str:
    """Where a file of a Hub repository is served: huggingface.co, or the mirror $HF_ENDPOINT names
    (Hugging Face's own variable for one, so a learner's existing setting just works)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{repo}/resolve/main/{filename}"


def hub_sha256(url: str, timeout: float = 30.0) -> str:
    """The sha256 the Hub publishes for a large (LFS) file, without downloading it."""
    response = requests.head(url, allow_redirects=False, timeout=timeout)  # the Hub answers 302 + headers
    response.raise_for_status()
    etag = response.headers.get("X-Linked-Etag") or response.headers.get("ETag") or ""
    etag = etag.removeprefix("W/").strip('"')
    if not re.fullmatch(r"[0-9a-f]{64}", etag):
        raise ValueError(f"{url} did not announce a sha256 (X-Linked-Etag: {etag!r}); cannot verify a download")
    return etag


def sha256_record(weights: Path) -> Path:
    """Where the sha256 a download was verified against is kept: beside the weights."""
    return weights.with_name(weights.name + ".sha256")


def record_sha256(weights: Path, sha256: str):
    with atomic_path(sha256_record(weights)) as tmp:
        tmp.write_text(sha256 + "\n")


def check_sha256(path: Path, expected: str, problem: str, fix: str):
    """Refuse `path` unless its sha256 is `expected`, saying what that means and what to do."""
    actual = sha256_of(path)
    if actual != expected:
        raise ValueError(f"{path} {problem}: its sha256 is {actual}, expected {expected}. {fix}")


def verify_cached(path: Path, url: str, timeout: float = 30.0):
    """Check a cached checkpoint against its recorded sha256 (or, with no record, the Hub's)."""
    record = sha256_record(path)
    if record.exists():
        expected = record.read_text().strip()
    else:
        try:
            expected = hub_sha256(url, timeout)
        except requests.RequestException as err:
            raise ValueError(
                f"{path} has no recorded sha256 ({record.name}) and {url} cannot be reached to get one, so the "
                f"file cannot be verified. Put its sha256 in {record}, or delete the file to download it again."
            ) from err
    check_sha256(path, expected, "is not the file that was downloaded",
                 f"Delete it (and {record.name}) to download it again.")
    if not record.exists():
        record_sha256(path, expected)


def fetch_hub_file(url: str, path: Path, timeout: float = 30.0, progress: bool = True) -> Path:
    """A large (LFS) file of a Hub repository, cached at `path`: a cached file is checked against
    its recorded sha256 (`verify_cached`); otherwise it is downloaded, checked against the sha256
    the Hub announces, and that sha256 is recorded beside it."""
    if path.exists():
        verify_cached(path, url, timeout)
        return path
    sha256 = hub_sha256(url, timeout)
    download(url, path, sha256, timeout=timeout, progress=progress)
    record_sha256(path, sha256)
    return path
