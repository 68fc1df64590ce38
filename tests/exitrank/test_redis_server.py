import redis

from exitrank.redis_server import EmbeddedRedis


def test_password_required_and_acknowledged_writes_survive_a_kill(tmp_path):
    server = EmbeddedRedis(tmp_path / "r").start()
    try:
        anonymous = redis.Redis(unix_socket_path=str(server.socket_path))
        try:
            anonymous.ping()
            raise AssertionError("a client without the password was let in")
        except redis.AuthenticationError:
            pass
        except redis.ResponseError as exc:  # NOAUTH on older servers
            assert "NOAUTH" in str(exc)
        client = redis.Redis.from_url(server.url)
        for i in range(200):
            client.xadd("s", {"i": i})
        server.kill()  # SIGKILL: only the append-only file can bring the entries back
        assert not server.running
        server.start()
        client = redis.Redis.from_url(server.url)
        assert client.xlen("s") == 200
    finally:
        server.stop()
    assert not server.running


def test_tcp_listener_is_loopback_only(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with EmbeddedRedis(tmp_path / "t", port=port) as server:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.ping()


def _wait(condition, what: str, timeout_s: float = 20.0):
    import time

    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def test_the_password_is_never_in_argv_and_a_dead_server_is_restarted(tmp_path):
    import os
    import signal

    server = EmbeddedRedis(tmp_path / "r").start().supervise()
    try:
        first = server.pid
        assert server.command[0].endswith("setpriv") and not any(server.password in arg for arg in server.command)
        conf = tmp_path / "r" / "redis.conf"
        assert oct(conf.stat().st_mode & 0o777) == "0o600" and server.password in conf.read_text()
        client = redis.Redis.from_url(server.url)
        client.set("kept", "yes")
        os.kill(first, signal.SIGKILL)  # dies on its own: nobody called stop()
        _wait(lambda: server.restarts == 1 and server.pid != first, "the supervisor's restart")
        assert redis.Redis.from_url(server.url).get("kept") == b"yes"  # same password, data from the AOF
    finally:
        server.stop()
    assert not server.running and server.restarts == 1  # stop() is not a death to restart from


def test_the_server_does_not_outlive_its_owner(tmp_path):
    """The owner is SIGKILLed (no finally, no atexit): the kernel stops its redis-server (pdeathsig)."""
    import os
    import subprocess
    import sys

    owner = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from exitrank.redis_server import EmbeddedRedis; "
        f"s = EmbeddedRedis({str(tmp_path / 'o')!r}).start().supervise(); print(s.pid, flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        pid = int(owner.stdout.readline())
        os.kill(pid, 0)  # running
        owner.kill()
        owner.wait(timeout=10)

        def gone() -> bool:
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    return stat.read().split()[2] == "Z"  # a zombie until init reaps it: stopped
            except FileNotFoundError:
                return True

        _wait(gone, "the orphaned redis-server to stop")
    finally:
        owner.kill()
