"""Settings: one frozen tree, env nesting, secret files, one-line errors naming the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.errors import ConfigError
from worker.settings import load_settings


def test_defaults_work_for_the_embedded_stack() -> None:
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert settings.kafka.auto_offset_reset == "earliest"
    assert settings.batching.max_batch_size >= 1


def test_env_nesting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPACE_BATCHING__MAX_WAIT_MS", "7.5")
    monkeypatch.setenv("SPACE_KAFKA__BOOTSTRAP_SERVERS", "a:1, b:2")
    settings = load_settings()
    assert settings.batching.max_wait_ms == 7.5
    assert settings.kafka.bootstrap_servers == "a:1,b:2"


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValidationError):
        settings.batching.max_batch_size = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("variable", "value", "needle"),
    [
        ("SPACE_KAFKA__BOOTSTRAP_SERVERS", "", "SPACE_KAFKA__BOOTSTRAP_SERVERS: must list at least one host:port"),
        ("SPACE_KAFKA__BOOTSTRAP_SERVERS", "nohost", "SPACE_KAFKA__BOOTSTRAP_SERVERS: 'nohost' is not host:port"),
        ("SPACE_LOG__LEVEL", "loud", "SPACE_LOG__LEVEL:"),
        ("SPACE_BATCHING__MAX_BATCH_SIZE", "0", "SPACE_BATCHING__MAX_BATCH_SIZE:"),
        ("SPACE_REDIS__URL", "http://x", "SPACE_REDIS__URL: must start with redis://"),
        # redis-py quietly used database 0 for a path that is no number.
        ("SPACE_REDIS__URL", "redis://r:6379/cache", "SPACE_REDIS__URL: the path must be a database number"),
        ("SPACE_HEATMAPS__STORE_URI", "/tmp/x", "SPACE_HEATMAPS__STORE_URI: must start with file:// or s3://"),
        ("SPACE_HEATMAPS__STORE_URI", "s3://", "SPACE_HEATMAPS__STORE_URI: s3:// names no bucket"),
        ("SPACE_HEATMAPS__STORE_URI", "s3:///prefix", "SPACE_HEATMAPS__STORE_URI: s3:// names no bucket"),
        ("SPACE_HEATMAPS__STORE_URI", "file://", "SPACE_HEATMAPS__STORE_URI: file:// names no directory"),
        (
            "SPACE_HEATMAPS__STORE_URI",
            "s3://plant-a/line heatmaps",
            "SPACE_HEATMAPS__STORE_URI: s3:// prefix contains ' '",
        ),
        (
            "SPACE_DECODE__CLAIM_CHECK_SCHEMES",
            "http",
            "SPACE_DECODE__CLAIM_CHECK_SCHEMES: http cannot be fetched (supported: s3, file)",
        ),
        ("SPACE_DECODE__CLAIM_CHECK_SCHEMES", "ftp,s3", "SPACE_DECODE__CLAIM_CHECK_SCHEMES: ftp cannot be fetched"),
        ("SPACE_KAFKA", "{bad", "SPACE_KAFKA: is not valid JSON (Expecting property name"),
        ("SPACE_KAFKA__TYPO", "1", "SPACE_KAFKA__TYPO:"),
        # kafka-python refused heartbeat >= session at the first consumer, naming no variable; a third is Kafka's rule.
        (
            "SPACE_KAFKA__HEARTBEAT_INTERVAL_MS",
            "4000",
            "SPACE_KAFKA: heartbeat_interval_ms (4000) must be at most a third of session_timeout_ms (10000)",
        ),
        # A typo in the section was silently ignored: the setting just did not apply.
        ("SPACE_MODEL__PRELOAD", "brick", "SPACE_MODEL__PRELOAD: no settings section 'model' (sections: batching,"),
        # Warm-up sizes of 0 or less passed, then every model load failed and every image was dead-lettered.
        (
            "SPACE_MODELS__WARMUP_BATCH_SIZES",
            "0",
            "SPACE_MODELS__WARMUP_BATCH_SIZES: each batch size must be 1 to 1024",
        ),
        ("SPACE_MODELS__WARMUP_BATCH_SIZES", "1,-1", "SPACE_MODELS__WARMUP_BATCH_SIZES: each batch size must be 1 to"),
        ("SPACE_MODELS__WARMUP_BATCH_SIZES", "[8, 1025]", "MAX_BATCH_SIZE's range) (got '[8, 1025]')"),
        # nan silently disabled the bound check; min above max refused every value.
        ("SPACE_THRESHOLDS__MIN_VALUE", "nan", "SPACE_THRESHOLDS__MIN_VALUE: Input should be a finite number"),
        ("SPACE_THRESHOLDS__MAX_VALUE", "inf", "SPACE_THRESHOLDS__MAX_VALUE: Input should be a finite number"),
        ("SPACE_THRESHOLDS__MAX_VALUE", "-inf", "SPACE_THRESHOLDS__MAX_VALUE: Input should be a finite number"),
        # Brokers refuse sessions under group.min.session.timeout.ms (6 s): the worker exited naming nothing.
        ("SPACE_KAFKA__SESSION_TIMEOUT_MS", "5000", "SPACE_KAFKA__SESSION_TIMEOUT_MS: Input should be greater than or"),
        ("SPACE_KAFKA__REQUEST_TIMEOUT_MS", "600000", "SPACE_KAFKA__REQUEST_TIMEOUT_MS: Input should be less than or"),
        ("SPACE_KAFKA__ISOLATION_LEVEL", "dirty", "SPACE_KAFKA__ISOLATION_LEVEL:"),
        # A misspelled name said "Extra inputs are not permitted (got 'kafka:9092')".
        (
            "SPACE_KAFKA__BOOTSTRAP_SERVRES",
            "kafka:9092",
            "SPACE_KAFKA__BOOTSTRAP_SERVRES: no such setting; did you mean SPACE_KAFKA__BOOTSTRAP_SERVERS?",
        ),
        ("SPACE_MODELS__PRELOADS", "brick", "SPACE_MODELS__PRELOADS: no such setting; did you mean SPACE_MODELS__PRELOAD?"),
    ],
)
def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str, needle: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_claim_check_schemes_and_store_uris_that_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPACE_DECODE__CLAIM_CHECK_SCHEMES", "S3, File")
    assert load_settings().decode.claim_check_schemes == ("s3", "file")  # the fetcher compares lowercase schemes
    monkeypatch.setenv("SPACE_DECODE__CLAIM_CHECK_SCHEMES", "")
    assert load_settings().decode.claim_check_schemes == ()
    for uri in (
        "s3://bucket",
        "s3://bucket/prefix/",
        "file:///var/lib/space/heatmaps",
        "file://.space/heatmaps",
        "file:///srv/heat maps",
    ):
        monkeypatch.setenv("SPACE_HEATMAPS__STORE_URI", uri)
        assert load_settings().heatmaps.store_uri == uri


def test_secret_files_and_redaction(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "kafka__sasl_password").write_text("hunter2-secret\n")
    monkeypatch.setenv("SPACE_SECRETS_DIR", str(tmp_path))
    monkeypatch.setenv("SPACE_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("SPACE_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("SPACE_KAFKA__SASL_USERNAME", "svc")
    settings = load_settings()
    assert settings.kafka.sasl_password is not None
    assert settings.kafka.sasl_password.get_secret_value() == "hunter2-secret"
    kwargs = settings.kafka.client_kwargs()
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_password"] == "hunter2-secret"
    assert "hunter2" not in str(settings.redacted())
    assert "hunter2" not in repr(settings)


def test_branch_streams_with_torch_compile_are_refused_at_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    from models.detector import BRANCHES_SETTING
    from worker.config_docs import env_variable

    assert env_variable("models", "concurrent_branches") == BRANCHES_SETTING  # the name models/ quotes
    monkeypatch.setenv(BRANCHES_SETTING, "true")
    assert load_settings().models.concurrent_branches  # fine on its own
    monkeypatch.setenv("SPACE_MODELS__COMPILE", "default")
    with pytest.raises(ConfigError, match="SPACE_MODELS__CONCURRENT_BRANCHES=true needs SPACE_MODELS__COMPILE=off"):
        load_settings()


def test_sasl_without_credentials_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPACE_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    with pytest.raises(ConfigError, match="SPACE_KAFKA: sasl_mechanism is required"):
        load_settings()


def test_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    file = tmp_path / "space.toml"
    file.write_text('[batching]\nmax_batch_size = 7\n[kafka]\ngroup_id = "line-7"\n')
    monkeypatch.setenv("SPACE_CONFIG_FILE", str(file))
    monkeypatch.setenv("SPACE_KAFKA__GROUP_ID", "from-env")
    settings = load_settings()
    assert settings.batching.max_batch_size == 7
    assert settings.kafka.group_id == "from-env"  # the environment wins over the file


def test_cli_stops_with_one_line_on_bad_setting() -> None:
    env = {"SPACE_KAFKA__BOOTSTRAP_SERVERS": "", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "stack", "status"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["space: error: SPACE_KAFKA__BOOTSTRAP_SERVERS: must list at least one host:port (got '')"]


def test_warmup_batch_sizes_within_the_batch_size_bounds_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPACE_MODELS__WARMUP_BATCH_SIZES", "1, 8, 1024")
    assert load_settings().models.warmup_batch_sizes == (1, 8, 1024)


def test_threshold_bounds_must_be_ordered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPACE_THRESHOLDS__MIN_VALUE", "0.9")
    monkeypatch.setenv("SPACE_THRESHOLDS__MAX_VALUE", "0.1")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "SPACE_THRESHOLDS__MIN_VALUE (0.9) must be at most SPACE_THRESHOLDS__MAX_VALUE (0.1)" in str(info.value)
    monkeypatch.setenv("SPACE_THRESHOLDS__MAX_VALUE", "0.9")
    assert load_settings().thresholds.min_value == load_settings().thresholds.max_value == 0.9
    monkeypatch.delenv("SPACE_THRESHOLDS__MAX_VALUE")
    assert load_settings().thresholds.max_value is None


@pytest.mark.parametrize(
    "url",
    [
        "redis://app:S3cr/etPass@host:6379/0",  # passed: only the text before the first / was checked
        "redis://app:S3cr?etPass@host:6379/0",
        "redis://app:S3cr#etPass@host:6379/0",
        "rediss://:S3cr/et/Pass@host:6379",
        "unix://app:S3cr/etPass@/run/redis.sock",
    ],
)
def test_credentials_in_the_redis_url_are_refused_without_echoing_them(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("SPACE_REDIS__URL", url)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith("SPACE_REDIS__URL: put credentials in SPACE_REDIS__USERNAME/PASSWORD")
    assert "S3cr" not in message and "etPass" not in message and "Pass" not in message


def test_a_client_key_without_its_certificate_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # kafka-python ignored ssl_keyfile without ssl_certfile: no client certificate was presented, silently.
    monkeypatch.setenv("SPACE_KAFKA__SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("SPACE_KAFKA__SSL_KEYFILE", "/etc/space/client.key")
    with pytest.raises(ConfigError, match="ssl_keyfile and ssl_password need ssl_certfile"):
        load_settings()
    monkeypatch.setenv("SPACE_KAFKA__SSL_CERTFILE", "/etc/space/client.crt")
    assert load_settings().kafka.ssl_certfile == Path("/etc/space/client.crt")


def test_serve_refuses_compile_on_a_cpu_without_a_cxx_compiler_at_start(tmp_path, monkeypatch) -> None:
    from worker.app import build_app

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    settings = load_settings(models={"compile": "default", "device": "cpu"}, worker={"state_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="SPACE_MODELS__COMPILE=default on CPU needs a C\\+\\+ compiler"):
        build_app(settings)


def test_serve_refuses_a_models_root_that_does_not_exist_at_start(tmp_path) -> None:
    # It used to start and dead-letter every image as unknown-product-line, advising a promotion that
    # could not work: a typo in the path turned a pod into a silent dead-letter machine.
    from worker.app import build_app

    missing = tmp_path / "no-such-registry"
    settings = load_settings(models={"root": str(missing)}, worker={"state_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=f"SPACE_MODELS__ROOT={missing}: no such directory"):
        build_app(settings)


def test_serve_with_unreachable_brokers_ends_with_one_line(tmp_path, monkeypatch, capsys) -> None:
    from worker.cli import main

    monkeypatch.setenv("SPACE_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:1")
    monkeypatch.setenv("SPACE_KAFKA__BOOTSTRAP_TIMEOUT_MS", "1000")
    monkeypatch.setenv("SPACE_MODELS__ROOT", str(tmp_path))
    monkeypatch.setenv("SPACE_WORKER__STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("SPACE_HTTP__ENABLED", "false")
    monkeypatch.setenv("SPACE_MODELS__MALLOC", "system")  # no mallopt in the test process
    assert main(["serve"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("space:")]
    assert errors == [
        "space: error: starting the worker at 127.0.0.1:1 failed: KafkaTimeoutError: Unable to bootstrap from "
        "['127.0.0.1:1'] (tried for SPACE_KAFKA__BOOTSTRAP_TIMEOUT_MS=1000 ms)"
    ]
