"""Security: no unpickling of model files, Redis AUTH (ACL user) and TLS, Kafka SASL/TLS configuration,
no secrets in logs.

Non-root container images are checked by tests/test_deploy/test_images.py (USER 10001) and the pod
securityContext by tests/test_deploy/test_kustomize.py; not repeated here.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from tests.reliability.helpers import REPO, log_events, spawn_worker, start_redis_server, stop_process
from worker.redis_client import make_redis
from worker.settings import KafkaSettings, RedisSettings, load_settings
from worker.thresholds import ThresholdStore


# ------------------------------------------------------------------------------------------------
# Model files are never unpickled
# ------------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates ``marker``: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _tampered_artifact(src: Path, dst: Path, weights_name: str, payload: bytes) -> Path:
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    (dst / weights_name).write_bytes(payload)
    card = json.loads((dst / "model.json").read_text())
    from models.artifact import sha256_file

    card["weights_file"] = weights_name
    card["weights_sha256"] = sha256_file(dst / weights_name)  # the hash matches: only the format can refuse
    (dst / "model.json").write_text(json.dumps(card))
    return dst


@pytest.mark.parametrize("weights_name", ["model.safetensors", "model.pth"])
def test_model_weights_holding_a_pickle_are_refused_unexecuted(trained_model, tmp_path, weights_name: str) -> None:
    import torch

    from models.artifact import ArtifactError, load_artifact
    from models.detector import Detector

    marker = tmp_path / "pwned"
    if weights_name.endswith(".pth"):
        torch.save({"w": _Payload(marker)}, tmp_path / "evil.pth")
        payload = (tmp_path / "evil.pth").read_bytes()
    else:
        payload = pickle.dumps(_Payload(marker))
    folder = _tampered_artifact(trained_model.root / trained_model.line / trained_model.version, tmp_path / "art",
                                weights_name, payload)  # fmt: skip
    with pytest.raises(ArtifactError, match="unreadable safetensors"):
        load_artifact(folder)
    with pytest.raises(ArtifactError):
        Detector.load(folder, device="cpu")
    assert not marker.exists(), "a pickle in the weights was executed"


def test_published_teacher_pth_with_a_pickle_payload_is_refused(tmp_path) -> None:
    import torch

    from models.teacher import TeacherError, load_published_teacher

    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": _Payload(marker)}, tmp_path / "teacher.pth")
    with pytest.raises(TeacherError):
        load_published_teacher(tmp_path / "teacher.pth", "s")
    assert not marker.exists()


_FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _unsafe_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import) else [(node.module or "").split(".")[0]]
            found += [f"{path}:{node.lineno} imports {n}" for n in names if n in _FORBIDDEN_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords if k.arg}
        torch_load = func.endswith("torch.load") or (func == "load" and "map_location" in kwargs)
        if torch_load and kwargs.get("weights_only") != "True":
            found.append(f"{path}:{node.lineno} {func}(...) without weights_only=True")
        if func.endswith(("np.load", "numpy.load")) and kwargs.get("allow_pickle") not in (None, "False"):
            found.append(f"{path}:{node.lineno} {func}(allow_pickle=...)")
        if func.endswith("yaml.load") and "SafeLoader" not in kwargs.get("Loader", ""):
            found.append(f"{path}:{node.lineno} yaml.load without SafeLoader")
    return found


def test_no_module_unpickles_anything() -> None:
    files = [p for d in ("worker", "models", "schemas", "bench") for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20
    problems = [msg for p in files for msg in _unsafe_calls(p)]
    assert problems == []


def test_the_unpickling_scan_can_fail(tmp_path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport torch\nx = torch.load('m.pth')\ny = torch.load('m', weights_only=False)\n")
    assert len(_unsafe_calls(bad)) == 3


# ------------------------------------------------------------------------------------------------
# Redis AUTH (ACL user) and TLS against private redis-servers
# ------------------------------------------------------------------------------------------------
USER, PASSWORD = "space-worker", "acl-Pa55-word-7c1e"


def test_redis_acl_user_is_required_and_confined(tmp_path) -> None:
    server = start_redis_server(
        tmp_path, "--user", "default", "off", "--user", USER, "on", f">{PASSWORD}", "~space-acl:*", "&space-acl:*", "+@all"
    )
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        good = make_redis(RedisSettings(url=url, username=USER, password=PASSWORD, key_prefix="space-acl"))
        store = ThresholdStore(good, "space-acl", 10)
        store.set("brick", 0.4, model_version="v1", method="manual", updated_by="t", force=True)
        assert store.get("brick").value == 0.4
        with pytest.raises(redis.exceptions.NoPermissionError):
            good.set("elsewhere", "x")  # the ACL confines the user to its prefix
        for kwargs in ({}, {"username": USER, "password": "wrong"}):
            client = make_redis(RedisSettings(url=url, key_prefix="space-acl", **kwargs))
            with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ResponseError)):
                client.ping()
    finally:
        server.stop()


def _make_ca_and_server_cert(tmp: Path) -> tuple[Path, Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def key_pem(key: Any) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "space-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    paths = tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key_pem(key))
    return paths


def _redis_supports_tls() -> str | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return "no redis-server on PATH"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    # Debian's build links OpenSSL; a build without TLS refuses --tls-port at start (checked below).
    return None if "v=" in out else f"unexpected redis-server --version: {out!r}"


def test_redis_over_tls_with_our_ca_and_refused_without_it(tmp_path) -> None:
    reason = _redis_supports_tls()
    if reason:
        pytest.skip(reason)
    ca, cert, key = _make_ca_and_server_cert(tmp_path)
    try:
        server = start_redis_server(tmp_path, "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                                    "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no", tls=True)  # fmt: skip
    except (RuntimeError, TimeoutError) as exc:
        log = "\n".join(p.read_text() for p in tmp_path.glob("redis-*.log"))
        if "TLS" in log or "tls" in log:
            pytest.skip(f"this redis-server has no TLS support: {log[-300:]}")
        raise AssertionError(log) from exc
    try:
        url = f"rediss://127.0.0.1:{server.port}/0"
        client = make_redis(RedisSettings(url=url, ssl_ca_certs=ca, key_prefix="tls"))
        store = ThresholdStore(client, f"tls-{server.port}", 10)
        store.set("brick", 0.3, model_version="v1", method="manual", updated_by="t", force=True)
        assert store.get("brick").value == 0.3
        # Without our CA the server certificate is not trusted; plain redis:// on the TLS port fails too.
        for settings in (RedisSettings(url=url, key_prefix="tls", socket_timeout_ms=2000),
                         RedisSettings(url=f"redis://127.0.0.1:{server.port}/0", key_prefix="tls", socket_timeout_ms=1000)):  # fmt: skip
            with pytest.raises(redis.exceptions.ConnectionError):
                make_redis(settings).ping()
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------
# Kafka SASL / TLS settings reach kafka-python
# ------------------------------------------------------------------------------------------------
def test_kafka_sasl_ssl_settings_reach_consumer_and_producer(tmp_path, monkeypatch) -> None:
    from kafka import KafkaConsumer, KafkaProducer

    import worker.kafka_clients as kc

    seen: dict[str, dict[str, Any]] = {}
    # make_consumer binds its assignor to the consumer's assignment(): the fake has one.
    monkeypatch.setattr(kc, "KafkaConsumer", lambda **kw: SimpleNamespace(assignment=set, kw=seen.setdefault("consumer", kw)))
    monkeypatch.setattr(kc, "KafkaProducer", lambda **kw: seen.setdefault("producer", kw))
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("x")
    k = KafkaSettings(
        bootstrap_servers="b1:9093,b2:9093", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
        sasl_username="svc-space", sasl_password="kafka-Secret-91", ssl_cafile=tmp_path / "ca.pem",
        ssl_certfile=tmp_path / "client.pem", ssl_keyfile=tmp_path / "client.key", ssl_password="key-Secret-33",
    )  # fmt: skip
    kc.make_consumer(k)
    kc.make_producer(k)
    for role, cls in (("consumer", KafkaConsumer), ("producer", KafkaProducer)):
        kw = seen[role]
        assert kw["bootstrap_servers"] == ["b1:9093", "b2:9093"]
        assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == "SCRAM-SHA-512"
        assert kw["sasl_plain_username"] == "svc-space" and kw["sasl_plain_password"] == "kafka-Secret-91"
        assert kw["ssl_cafile"] == str(tmp_path / "ca.pem") and kw["ssl_certfile"] == str(tmp_path / "client.pem")
        assert kw["ssl_keyfile"] == str(tmp_path / "client.key") and kw["ssl_password"] == "key-Secret-33"
        unknown = set(kw) - set(cls.DEFAULT_CONFIG)
        assert not unknown, f"{role}: kafka-python does not know {unknown}"
    # PLAINTEXT never sends SSL files; SASL without credentials is refused before anything connects.
    plain = KafkaSettings(ssl_cafile=tmp_path / "ca.pem").client_kwargs()
    assert "ssl_cafile" not in plain and "sasl_plain_password" not in plain
    from worker.errors import ConfigError

    with pytest.raises(ConfigError, match="SPACE_KAFKA"):
        load_settings(kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u"})


# ------------------------------------------------------------------------------------------------
# Secrets never appear in logs
# ------------------------------------------------------------------------------------------------
SECRETS = {
    "SPACE_REDIS__PASSWORD": "redis-Secret-4f2a9",
    "SPACE_KAFKA__SASL_PASSWORD": "kafka-Secret-77b1c",
    "SPACE_S3__SECRET_ACCESS_KEY": "s3-Secret-0d93e",
    "SPACE_KAFKA__SSL_PASSWORD": "sslkey-Secret-5a6b",
}


@pytest.mark.kafka
def test_worker_runs_with_secrets_and_logs_none_of_them(stack, tmp_path) -> None:
    """Three runs at DEBUG level: a worker that starts and serves (secrets set, Redis really needs its
    password), one whose Kafka SASL handshake fails (Tansu has no SASL: the client's bootstrap fails
    after kafka-python's DEBUG lines, and the worker stops with one line), and one with a bad setting
    (the config error path)."""
    import os

    server = start_redis_server(tmp_path / "redis", "--requirepass", SECRETS["SPACE_REDIS__PASSWORD"])
    (tmp_path / "models").mkdir()  # an empty registry: serve refuses a root that does not exist
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPACE_")}
        env.update(SECRETS)
        env.update({
            "SPACE_KAFKA__BOOTSTRAP_SERVERS": stack.bootstrap_servers, "SPACE_KAFKA__SASL_USERNAME": "svc",
            "SPACE_KAFKA__GROUP_ID": f"g-{server.port}", "SPACE_KAFKA__SESSION_TIMEOUT_MS": "6000",
            "SPACE_KAFKA__REQUESTS_TOPIC": f"sec-req-{server.port}",
            "SPACE_REDIS__URL": f"redis://127.0.0.1:{server.port}/0", "SPACE_REDIS__KEY_PREFIX": f"sec-{server.port}",
            "SPACE_S3__ACCESS_KEY_ID": "AKIDEXAMPLE", "SPACE_MODELS__ROOT": str(tmp_path / "models"),
            "SPACE_HTTP__PORT": "0", "SPACE_HTTP__HOST": "127.0.0.1", "SPACE_WORKER__STATE_DIR": str(tmp_path / "state"),
            "SPACE_WORKER__SHUTDOWN_GRACE_S": "3", "SPACE_LOG__LEVEL": "DEBUG", "SPACE_LOG__FORMAT": "json",
            "SPACE_SECRETS_DIR": str(tmp_path / "none"), "PYTHONUNBUFFERED": "1",
        })  # fmt: skip
        ok_log, sasl_log = tmp_path / "ok.log", tmp_path / "sasl.log"
        proc = spawn_worker(env, ok_log)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not any(e.get("event") == "threshold_watch_subscribed" for e in log_events(ok_log)):
            assert proc.poll() is None, ok_log.read_text()[-2000:]
            time.sleep(0.2)
        assert stop_process(proc, signal.SIGTERM, timeout_s=20) == 0, ok_log.read_text()[-2000:]
        sasl_env = {**env, "SPACE_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT", "SPACE_KAFKA__SASL_MECHANISM": "PLAIN"}
        proc = spawn_worker(sasl_env, sasl_log)
        try:
            proc.wait(90)
        finally:
            stop_process(proc, signal.SIGKILL)
        bad = subprocess.run([*proc.args], env={**sasl_env, "SPACE_KAFKA__SASL_MECHANISM": "NOPE"}, cwd=REPO,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        server.stop()
    runs = {"serving": ok_log.read_text(errors="replace"), "sasl-failure": sasl_log.read_text(errors="replace"),
            "config-error": bad.stdout + bad.stderr}  # fmt: skip
    assert "worker_started" in runs["serving"] and "worker_stopped" in runs["serving"]
    assert proc.returncode != 0 and "space: error: starting the worker at " in runs["sasl-failure"]
    assert bad.returncode != 0 and "SPACE_KAFKA" in runs["config-error"]
    leaked = [(run, name) for run, text in runs.items() for name, secret in SECRETS.items() if secret in text]
    assert leaked == [], f"secrets in the logs: {leaked}"


def test_a_redis_url_with_credentials_is_refused_without_echoing_them() -> None:
    from worker.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_settings(redis={"url": "redis://admin:url-Secret-31@10.0.0.5:6379/0"})
    assert "url-Secret-31" not in str(info.value)
    assert str(info.value).startswith("SPACE_REDIS__URL: put credentials in SPACE_REDIS__USERNAME/PASSWORD")


@pytest.mark.parametrize(
    "url",
    [
        "redis://10.0.0.5:6379/0?password=hunter2-31",
        "redis://10.0.0.5:6379/0?db=0&username=admin&password=hunter2-31",
        "rediss://10.0.0.5:6379/0?PASSWORD=hunter2-31",
        "unix:///run/redis.sock?pass%77ord=hunter2-31",
    ],
)
def test_a_redis_url_with_credentials_in_its_query_is_refused_without_echoing_them(url: str) -> None:
    # redis-py passes every query parameter to the connection: ?password= would AUTH, and the URL is printed.
    from worker.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_settings(redis={"url": url})
    assert "hunter2-31" not in str(info.value)
    assert str(info.value).startswith("SPACE_REDIS__URL: put credentials in SPACE_REDIS__USERNAME/PASSWORD")


def test_redact_url_hides_user_info_and_credential_parameters() -> None:
    from worker.settings import redact_url

    assert redact_url("redis://127.0.0.1:6379/0?db=1") == "redis://127.0.0.1:6379/0?db=1"
    assert redact_url("redis://admin:pw-1@h:6379/0?password=pw-2&db=1") == "redis://***@h:6379/0?password=***&db=1"
    assert redact_url("unix:///run/redis.sock?pass%77ord=pw") == "unix:///run/redis.sock?pass%77ord=***"
    assert redact_url("redis://u:p/w?x@h:6379/0") == "redis://***@h:6379/0"  # a password holding / and ?


_LEAKY_URL = "redis://:print-Secret-8@127.0.0.1:{port}/0?password=print-Secret-8"


def test_thresholds_command_error_shows_the_redis_url_redacted(monkeypatch) -> None:
    # The URL validator refuses such a URL at load; the message is redacted anyway (defence in depth).
    import argparse
    import socket

    import worker.logging
    import worker.settings
    from worker.commands import thresholds
    from worker.errors import SpaceError
    from worker.settings import Settings

    with socket.socket() as probe:  # a port nothing listens on: the command fails with a RedisError
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings.model_construct(redis=RedisSettings.model_construct(url=_LEAKY_URL.format(port=port)))
    monkeypatch.setattr(worker.settings, "load_settings", lambda: settings)
    monkeypatch.setattr(worker.logging, "configure_logging", lambda *a, **k: None)
    with pytest.raises(SpaceError) as info:
        thresholds.run(argparse.Namespace(action="get", line="brick", json=False))
    assert "print-Secret-8" not in str(info.value)
    assert f"Redis at redis://***@127.0.0.1:{port}/0?password=*** failed" in str(info.value)


def test_stack_logs_an_adopted_redis_url_redacted(monkeypatch, tmp_path) -> None:
    from structlog.testing import capture_logs

    import worker.stack
    from worker.stack import Stack

    monkeypatch.setattr(worker.stack, "redis_answers", lambda url: True)
    with capture_logs() as events:
        Stack(tmp_path, redis_url=_LEAKY_URL.format(port=6390))._start_or_adopt_redis(None)
    adopted = [e for e in events if e["event"] == "stack_redis_adopted"]
    assert [e["url"] for e in adopted] == ["redis://***@127.0.0.1:6390/0?password=***"]


def _unredacted_redis_urls(path: Path) -> list[str]:
    """f-string fields and log/print arguments that show a Redis URL without redact_url()."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        shown = [node.value] if isinstance(node, ast.FormattedValue) else []
        if isinstance(node, ast.Call) and ast.unparse(node.func).startswith(("log.", "logger.", "print")):
            shown += [*node.args, *(k.value for k in node.keywords)]
        found += [
            f"{path}:{node.lineno} {ast.unparse(e)}"
            for e in shown
            if ast.unparse(e).endswith(("redis.url", "redis_url"))
        ]
    return found


def test_no_module_prints_a_redis_url_unredacted(tmp_path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text('raise E(f"Redis at {settings.redis.url}")\nlog.info("x", url=self.redis_url)\n')
    assert len(_unredacted_redis_urls(bad)) == 2  # the scan can fail
    files = sorted((REPO / "worker").rglob("*.py"))
    assert [msg for p in files for msg in _unredacted_redis_urls(p)] == []
