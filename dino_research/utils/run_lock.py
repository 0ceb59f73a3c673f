"""One training run per OUTPUT_DIR: a lock file held for the whole run.

Two runs writing the same folder would resume from each other's checkpoints and mix their weights,
so a second run refuses at once, naming the holder (host, PID, start time, SLURM job) and the fix.

How it works, and why (the folder is often on a cluster's shared file system, NFS or Lustre, where
``flock``/``fcntl`` locks are either local to one node or need a mount option):

* **Taking the lock** writes ``OUTPUT_DIR/run.lock`` (JSON: host, PID, process start time, start date,
  SLURM job, command, a random token) to a private temporary file, then ``os.link``s it to
  ``run.lock``. ``link`` fails when the name exists, atomically, on local file systems and on
  NFS/Lustre alike (the classic NFS-safe lock), and the lock file is complete the moment it exists.
* **Holding it**: a daemon thread touches the file every ``heartbeat_s`` seconds; on a network file
  system the server stamps the time, so nodes whose clocks disagree still agree on its age.
* **A stale lock** is taken over, with a warning naming the previous holder: a holder on this host
  whose process is gone (PID not alive, or alive with another start time: a reused PID); a holder
  on another host whose heartbeat is older than ``stale_after_s`` (its node crashed; the age is
  measured against a file just written to the same folder, i.e. the file server's clock); a holder
  with this process's SLURM job id and another process (a requeued job restarts while SLURM
  guarantees its previous run has ended).
* **Release** deletes the file (only if it still holds this process's token) on any normal or
  exceptional exit; a killed process leaves it behind as stale.

Only one process of a multi-process job holds it (:func:`hold_run_lock`: rank 0, its decision sent
to every rank, so the whole job refuses together).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from typing import Iterator, Optional

from .errors import UserError

logger = logging.getLogger("dino_research")

LOCK_FILE = "run.lock"
# The holder touches the lock this often...
HEARTBEAT_S = 30.0
# ...and a lock of another host untouched this long belongs to a dead run. Generous: a node under
# heavy I/O can stall a thread for minutes, and a false takeover is worse than a late one.
STALE_AFTER_S = 600.0


class RunLockedError(UserError):
    """OUTPUT_DIR is held by another live run, or cannot hold a lock at all."""


class OutputDirError(UserError):
    """OUTPUT_DIR cannot be used: a file in its place, no permission, a read-only file system."""


def _process_start_ticks(pid: int) -> Optional[int]:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Field 22; the command name (field 2) may hold spaces and parentheses: split after it.
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int, start_ticks: Optional[int] = None) -> bool:
    """Whether process ``pid`` of this host is alive and (when known) started at ``start_ticks``."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    if start_ticks is not None:
        now = _process_start_ticks(pid)
        if now is not None and now != start_ticks:
            return False  # the PID was reused by another process
    return True


def this_host() -> str:
    return socket.gethostname()


def _slurm_job() -> str:
    """``JOBID`` (or ``ARRAYJOB_TASK`` for an array task) of the SLURM job of this process, or ""."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID", "")


def _fs_now(folder: str) -> float:
    """The current time as the file system holding ``folder`` stamps it (a file written and removed)."""
    probe = os.path.join(folder, f".clock.{this_host()}.{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
        return os.stat(probe).st_mtime
    except OSError:
        return time.time()
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)


def describe_holder(info: dict) -> str:
    job = f", SLURM job {info['slurm_job']}" if info.get("slurm_job") else ""
    return (f"host {info.get('host', '?')}, PID {info.get('pid', '?')}{job}, started "
            f"{info.get('started', '?')}: {info.get('command', '?')}")


def check_output_dir(output_dir: str) -> None:
    """Create ``output_dir`` if needed and prove it writable, or raise :class:`OutputDirError`
    (a :class:`UserError`) naming it: a file in its place, no permission, a read-only file system."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputDirError(f"OUTPUT_DIR = {output_dir} is a file, not a folder; set OUTPUT_DIR to a folder path")
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write_test.{this_host()}.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise OutputDirError(f"OUTPUT_DIR = {output_dir} is not writable ({e.strerror or e}); choose another "
                             f"OUTPUT_DIR or fix its permissions") from None


class RunLock:
    """The lock of ``output_dir`` (see the module docstring); use as a context manager or call
    :meth:`acquire` / :meth:`release`."""

    def __init__(self, output_dir: str, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.output_dir, self.path = output_dir, os.path.join(output_dir, LOCK_FILE)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.info = {
            "host": this_host(), "pid": os.getpid(), "start_ticks": _process_start_ticks(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "slurm_job": _slurm_job(),
            "command": " ".join(sys.argv)[:500], "token": secrets.token_hex(8),
        }
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.held = False
        # What a takeover of a stale lock replaced, for the caller to log once its logger is set up.
        self.took_over = ""

    # ------------------------------------------------------------------ reading the holder
    def read_holder(self) -> Optional[dict]:
        """The holder's record, ``{}`` when the file is unreadable, None when there is no lock."""
        try:
            with open(self.path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def stale_reason(self, holder: dict) -> Optional[str]:
        """Why ``holder``'s lock belongs to a dead run, or None while it may be alive."""
        me = self.info
        if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int):
            if holder["pid"] == me["pid"] and holder.get("token") != me["token"]:
                return "left by an earlier run of this same process"
            if not process_alive(holder["pid"], holder.get("start_ticks")):
                return f"its process {holder['pid']} is no longer running"
            return None
        if me["slurm_job"] and holder.get("slurm_job") == me["slurm_job"]:
            return f"this is SLURM job {me['slurm_job']} again (requeued); its previous run has ended"
        try:
            age = _fs_now(self.output_dir) - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return "it was released meanwhile"
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s (more than {self.stale_after_s:.0f} s: its node or process died)"
        return None

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> None:
        """Take the lock, taking over a stale one; raise :class:`RunLockedError` if a live run holds it."""
        check_output_dir(self.output_dir)
        for _ in range(5):  # a takeover race with another starting run: try again, a few times
            if self._try_link():
                self.held = True
                self._start_heartbeat()
                return
            holder = self.read_holder()
            if holder is None:
                continue  # released between our attempt and the read
            reason = self.stale_reason(holder) if holder else self._unreadable_reason()
            if reason is None:
                raise RunLockedError(
                    f"OUTPUT_DIR {self.output_dir} is in use by another run ({describe_holder(holder)}). Two runs "
                    f"in one folder would resume from each other's checkpoints. Wait for it to end, stop it, or "
                    f"set another OUTPUT_DIR. If that run is dead (its node crashed), delete {self.path}; a lock "
                    f"of another host is also taken over after {self.stale_after_s:.0f} s without a heartbeat."
                )
            self._take_over(holder, reason)
        raise RunLockedError(f"could not take the lock {self.path}: other runs keep taking it; start one run at a time")

    def _unreadable_reason(self) -> Optional[str]:
        """A lock file we cannot parse is stale only once it is old (never written by us half-way:
        it is linked complete), e.g. a file damaged by a crash of the file server."""
        try:
            age = _fs_now(self.output_dir) - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return "it was released meanwhile"
        return f"unreadable and untouched for {age:.0f} s" if age > self.stale_after_s else None

    def _try_link(self) -> bool:
        tmp = f"{self.path}.{self.info['host']}.{self.info['pid']}.{self.info['token']}"
        try:
            with open(tmp, "w") as f:
                json.dump(self.info, f)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            raise RunLockedError(f"cannot create the lock {self.path} ({e.strerror or e}); check that OUTPUT_DIR "
                                 f"is writable and on a file system with hard links") from None
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)

    def _take_over(self, holder: dict, reason: str) -> None:
        moved = f"{self.path}.stale.{self.info['host']}.{self.info['pid']}"
        try:
            os.rename(self.path, moved)  # only one of several racing runs succeeds
        except FileNotFoundError:
            return
        with contextlib.suppress(OSError):
            os.remove(moved)
        self.took_over = (f"took over the lock of {self.output_dir} from "
                          f"{describe_holder(holder) if holder else 'an unreadable lock file'}: {reason}")
        logger.debug(self.took_over)

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(self.heartbeat_s):
                holder = self.read_holder()
                if holder is None or holder.get("token") != self.info["token"]:
                    logger.error("the lock %s was taken by another run (%s) while this run held it: this run's "
                                 "heartbeat stalled for more than %.0f s. Stop one of the two runs.", self.path,
                                 describe_holder(holder or {}), self.stale_after_s)
                    return
                with contextlib.suppress(OSError):
                    os.utime(self.path)  # None: the file system's own clock stamps it

        self._thread = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours; safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held and (self.read_holder() or {}).get("token") == self.info["token"]:
            with contextlib.suppress(OSError):
                os.remove(self.path)
        self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def hold_run_lock(output_dir: str, **kwargs) -> Iterator[Optional[RunLock]]:
    """Hold the lock of ``output_dir`` on rank 0 for the duration of the block; collective.

    Every rank enters together: rank 0 takes the lock, its outcome is broadcast, and every rank raises
    the same :class:`RunLockedError` when it is refused. Yields the lock on rank 0, None elsewhere.
    """
    from . import comm

    lock, error = None, ""
    if comm.is_main_process():
        lock = RunLock(output_dir, **kwargs)
        try:
            lock.acquire()
        except RunLockedError as e:
            error = str(e)
    if comm.get_world_size() > 1:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise RunLockedError(error)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
