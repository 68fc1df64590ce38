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
