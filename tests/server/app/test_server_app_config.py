"""The server configuration: defaults, the TOML file, environment overrides, flags, their
precedence, and that every bad value is refused with one line naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from medrelay.crypto.passwords import PasswordParams
from medrelay.server.config import (
    DEFAULT_INDICATIONS,
    ConfigError,
    ConsentMode,
    IndicationConfig,
    LogFormat,
    LogLevelName,
    Overrides,
    VisitsConfig,
    load_config,
)
from medrelay.server.relay.service import RelayConfig


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "medrelay.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_the_embedded_setup_under_var(tmp_path: Path) -> None:
    """With nothing configured: SQLite and keys under ./var, clients on 127.0.0.1:8448, metrics
    on 127.0.0.1:9464, JSON logs at info, the relay's own defaults."""
    config = load_config(environ={}, cwd=tmp_path)
    assert config.storage.data_dir == tmp_path / "var"
    assert config.storage.database_url == f"sqlite:///{tmp_path}/var/medrelay.db"
    assert config.keys.dir == tmp_path / "var" / "keys"
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8448)
    assert (config.metrics.host, config.metrics.port, config.metrics.enabled) == (
        "127.0.0.1",
        9464,
        True,
    )
    assert config.server.clinic_id == "medrelay.local"
    assert not config.server.tls
    assert config.relay == RelayConfig(clinic_id="medrelay.local")
    assert config.enrollment.code_ttl_hours == 72
    assert config.enrollment.max_attempts == 10
    assert config.blobs.max_size_bytes == 25 * 1024 * 1024
    assert config.passwords == PasswordParams()
    assert (config.logging.level, config.logging.format) == (LogLevelName.INFO, LogFormat.JSON)
    assert config.source is None


def test_config_objects_are_frozen(tmp_path: Path) -> None:
    config = load_config(environ={}, cwd=tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1  # type: ignore[misc]


def test_toml_file_sets_every_section(tmp_path: Path) -> None:
    """Each section of the file reaches its typed field; relative paths are resolved against
    the working directory."""
    path = write(
        tmp_path,
        """
        [server]
        clinic_id = "clinic.example"
        host = "0.0.0.0"
        port = 9443
        public_url = "https://relay.clinic.example/"
        trust_x_forwarded_for = 1
        [metrics]
        port = 9999
        enabled = false
        [storage]
        data_dir = "state"
        [keys]
        root_passphrase_path = "/run/secrets/root"
        [relay]
        queue_cap = 500
        ttl_s = 86400
        auth_timeout_s = 5.5
        [enrollment]
        code_ttl_hours = 24
        max_attempts = 5
        [blobs]
        max_size_bytes = 1048576
        [passwords]
        time_cost = 2
        memory_cost_kib = 19456
        parallelism = 1
        [logging]
        level = "warn"
        format = "text"
        """,
    )
    config = load_config(path, environ={}, cwd=tmp_path)
    assert config.source == path
    assert config.server.clinic_id == "clinic.example"
    assert config.relay.clinic_id == "clinic.example"
    assert (config.server.host, config.server.port) == ("0.0.0.0", 9443)  # noqa: S104
    assert config.server.public_url == "https://relay.clinic.example"
    assert config.server.trust_x_forwarded_for == 1
    assert (config.metrics.port, config.metrics.enabled) == (9999, False)
    assert config.storage.data_dir == tmp_path / "state"
    assert config.storage.database_url == f"sqlite:///{tmp_path}/state/medrelay.db"
    assert config.keys.dir == tmp_path / "state" / "keys"
    assert config.keys.root_passphrase_path == Path("/run/secrets/root")
    assert (config.relay.queue_cap, config.relay.ttl_s) == (500, 86400)
    assert config.relay.auth_timeout_s == 5.5
    assert (config.enrollment.code_ttl_hours, config.enrollment.max_attempts) == (24, 5)
    assert config.blobs.max_size_bytes == 1048576
    assert config.passwords == PasswordParams(time_cost=2, memory_cost_kib=19456, parallelism=1)
    assert (config.logging.level, config.logging.format) == (LogLevelName.WARN, LogFormat.TEXT)


def test_environment_overrides_use_section_and_key_names(tmp_path: Path) -> None:
    config = load_config(
        environ={
            "MEDRELAY_SERVER_PORT": "9000",
            "MEDRELAY_RELAY_QUEUE_CAP": "42",
            "MEDRELAY_RELAY_EXPIRY_INTERVAL_S": "2.5",
            "MEDRELAY_METRICS_ENABLED": "no",
            "MEDRELAY_STORAGE_DATABASE_URL": "postgresql://relay@db/medrelay",
            "MEDRELAY_LOGGING_FORMAT": "TEXT",
        },
        cwd=tmp_path,
    )
    assert config.server.port == 9000
    assert config.relay.queue_cap == 42
    assert config.relay.expiry_interval_s == 2.5
    assert config.metrics.enabled is False
    assert config.storage.database_url == "postgresql://relay@db/medrelay"
    assert config.logging.format is LogFormat.TEXT


def test_precedence_defaults_file_environment_flags(tmp_path: Path) -> None:
    """A flag beats the environment, which beats the file, which beats the default."""
    path = write(tmp_path, "[server]\nport = 1111\n[metrics]\nport = 2222\n[relay]\nttl_s = 60\n")
    config = load_config(
        path,
        environ={"MEDRELAY_SERVER_PORT": "3333", "MEDRELAY_METRICS_PORT": "4444"},
        cwd=tmp_path,
        overrides=Overrides(port=5555),
    )
    assert config.server.port == 5555  # flag over environment over file
    assert config.metrics.port == 4444  # environment over file
    assert config.relay.ttl_s == 60  # file over default
    assert config.relay.queue_cap == 10_000  # default


def test_data_dir_flag_moves_database_and_keys_unless_set_explicitly(tmp_path: Path) -> None:
    config = load_config(environ={}, cwd=tmp_path, overrides=Overrides(data_dir=Path("/srv/x")))
    assert config.storage.database_url == "sqlite:////srv/x/medrelay.db"
    assert config.keys.dir == Path("/srv/x/keys")
    explicit = load_config(
        environ={"MEDRELAY_STORAGE_DATABASE_URL": "sqlite:////elsewhere.db"},
        cwd=tmp_path,
        overrides=Overrides(data_dir=Path("/srv/x")),
    )
    assert explicit.storage.database_url == "sqlite:////elsewhere.db"


def test_config_file_from_environment_variable(tmp_path: Path) -> None:
    write(tmp_path, "[server]\nport = 7777\n")
    config = load_config(environ={"MEDRELAY_CONFIG": "medrelay.toml"}, cwd=tmp_path)
    assert config.server.port == 7777


def test_other_medrelay_variables_are_not_configuration(tmp_path: Path) -> None:
    """MEDRELAY_ROOT_PASSPHRASE, the client's MEDRELAY_PASSPHRASE and the test database URL
    live in the same namespace without being mistaken for settings."""
    config = load_config(
        environ={
            "MEDRELAY_ROOT_PASSPHRASE": "secret",
            "MEDRELAY_PASSPHRASE": "secret",
            "MEDRELAY_TEST_POSTGRES_URL": "postgresql://x",
            "MEDRELAY_DEBUG": "1",
        },
        cwd=tmp_path,
    )
    assert config.server.port == 8448


BAD_VALUES = [
    ("MEDRELAY_RELAY_QUEUE_CAP", "0", "relay.queue_cap", "must be a positive integer"),
    ("MEDRELAY_RELAY_QUEUE_CAP", "-3", "relay.queue_cap", "must be a positive integer"),
    ("MEDRELAY_RELAY_QUEUE_CAP", "many", "relay.queue_cap", "must be a positive integer"),
    ("MEDRELAY_RELAY_TTL_S", "1.5", "relay.ttl_s", "must be a positive integer"),
    ("MEDRELAY_RELAY_AUTH_TIMEOUT_S", "0", "relay.auth_timeout_s", "must be a positive number"),
    ("MEDRELAY_RELAY_AUTH_TIMEOUT_S", "inf", "relay.auth_timeout_s", "must be a positive number"),
    ("MEDRELAY_RELAY_WINDOW_ITEMS", "1000", "relay.window_items", "must be at most 256"),
    ("MEDRELAY_RELAY_MAX_FRAME_SIZE", "100", "relay.max_frame_size", "must be at least"),
    ("MEDRELAY_RELAY_PREKEY_LOW_WATER", "150", "relay.prekey_low_water", "must not exceed"),
    ("MEDRELAY_SERVER_PORT", "70000", "server.port", "must be a port number"),
    ("MEDRELAY_SERVER_PORT", "http", "server.port", "must be an integer"),
    ("MEDRELAY_SERVER_HOST", "[::1]", "server.host", "must be a host name or IP address"),
    ("MEDRELAY_SERVER_CLINIC_ID", "a" * 65, "server.clinic_id", "longer than 64 bytes"),
    ("MEDRELAY_SERVER_PUBLIC_URL", "ftp://x", "server.public_url", "http:// or https://"),
    ("MEDRELAY_SERVER_PUBLIC_URL", "https://x/path", "server.public_url", "only the scheme"),
    ("MEDRELAY_SERVER_TRUST_X_FORWARDED_FOR", "99", "server.trust_x_forwarded_for", "0-16"),
    ("MEDRELAY_METRICS_ENABLED", "maybe", "metrics.enabled", "must be true or false"),
    ("MEDRELAY_STORAGE_DATABASE_URL", "mysql://x", "storage.database_url", "sqlite:///"),
    ("MEDRELAY_ENROLLMENT_CODE_TTL_HOURS", "0", "enrollment.code_ttl_hours", "positive"),
    ("MEDRELAY_ENROLLMENT_MAX_ATTEMPTS", "5000", "enrollment.max_attempts", "at most 1000"),
    ("MEDRELAY_BLOBS_MAX_SIZE_BYTES", str(2**40), "blobs.max_size_bytes", "must be at most"),
    ("MEDRELAY_PASSWORDS_TIME_COST", "99", "passwords.time_cost", "must be at most 16"),
    ("MEDRELAY_PASSWORDS_MEMORY_COST_KIB", "4", "passwords.memory_cost_kib", "8 KiB per lane"),
    ("MEDRELAY_LOGGING_LEVEL", "loud", "logging.level", "must be one of debug, info"),
    ("MEDRELAY_LOGGING_FORMAT", "xml", "logging.format", "must be one of json, text"),
    ("MEDRELAY_VISITS_CONSENT", "implied", "visits.consent", "must be one of notice, explicit"),
    ("MEDRELAY_VISITS_INDICATIONS", "a,b", "visits.indications", "in the configuration file"),
]


@pytest.mark.parametrize(("variable", "raw", "key", "problem"), BAD_VALUES)
def test_every_bad_value_is_one_line_naming_the_key(
    tmp_path: Path, variable: str, raw: str, key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={variable: raw}, cwd=tmp_path)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"{key} (from {variable}): ")
    assert problem in text


def test_issue_example_message(tmp_path: Path) -> None:
    path = write(tmp_path, "[relay]\nqueue_cap = -1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={}, cwd=tmp_path)
    assert str(caught.value) == "relay.queue_cap: must be a positive integer"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[server]\nport = "8448"\n', "server.port: must be an integer"),
        ("[server]\nport = true\n", "server.port: must be an integer"),
        ("[relay]\nqueue_cap = 1.5\n", "relay.queue_cap: must be a positive integer"),
        ('[metrics]\nenabled = "yes"\n', "metrics.enabled: must be true or false"),
        ("[server]\nhost = 5\n", "server.host: must be a string"),
        ('[server]\nhost = ""\n', "server.host: must not be empty"),
        ('[server]\nclinic_id = "a\\nb"\n', "server.clinic_id: must be one short line"),
    ],
)
def test_toml_values_are_typed_strictly(tmp_path: Path, toml: str, message: str) -> None:
    """In a file, types are TOML's: a quoted number is not a number (the environment, which
    only has text, is parsed leniently instead)."""
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, toml), environ={}, cwd=tmp_path)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[server]\nprot = 1\n", "server.prot: unknown setting"),
        ("[serverr]\nport = 1\n", "serverr: unknown section"),
        ('[relay]\nclinic_id = "x"\n', "relay.clinic_id: unknown setting"),
        ("port = 1\n", "port: settings belong in a [section]"),
        ('[keys]\nroot_passphrase = "hunter2"\n', "keys.root_passphrase: secrets are never"),
    ],
)
def test_unknown_keys_and_inline_secrets_are_refused(
    tmp_path: Path, toml: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, toml), environ={}, cwd=tmp_path)
    assert str(caught.value).startswith(message)


def test_unknown_environment_key_of_a_known_section_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"MEDRELAY_RELAY_QUEUECAP": "5"}, cwd=tmp_path)
    assert str(caught.value) == "MEDRELAY_RELAY_QUEUECAP: unknown setting"


def test_tls_needs_both_certificate_and_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"MEDRELAY_SERVER_TLS_CERTIFICATE_PATH": "cert.pem"}, cwd=tmp_path)
    assert str(caught.value).startswith("server.tls_key_path: must be set together")
    config = load_config(
        environ={
            "MEDRELAY_SERVER_TLS_CERTIFICATE_PATH": "cert.pem",
            "MEDRELAY_SERVER_TLS_KEY_PATH": "/etc/key.pem",
        },
        cwd=tmp_path,
    )
    assert config.server.tls
    assert config.server.tls_certificate_path == tmp_path / "cert.pem"
    assert config.server.tls_key_path == Path("/etc/key.pem")


def test_unreadable_or_invalid_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing:
        load_config(tmp_path / "absent.toml", environ={}, cwd=tmp_path)
    assert "cannot read the configuration file" in str(missing.value)
    with pytest.raises(ConfigError) as broken:
        load_config(write(tmp_path, "[server\nport=1"), environ={}, cwd=tmp_path)
    assert "not valid TOML" in str(broken.value)


def test_every_relay_setting_is_configurable(tmp_path: Path) -> None:
    """Each field of RelayConfig (but the clinic id, which is server.clinic_id) has a [relay]
    key, so a new relay tunable cannot be forgotten here."""
    lines = ["[relay]"]
    expected = {}
    for f in dataclasses.fields(RelayConfig):
        if f.name == "clinic_id":
            continue
        default = getattr(RelayConfig(clinic_id="x"), f.name)
        wanted = default / 2 if isinstance(default, float) else max(1, default - 1)
        expected[f.name] = wanted
        lines.append(f"{f.name} = {wanted!r}")
    if "max_frame_size" in expected:  # must stay above the unauthenticated frame limit
        expected["max_frame_size"] = 512 * 1024
        lines = [line for line in lines if not line.startswith("max_frame_size")]
        lines.append("max_frame_size = 524288")
    config = load_config(write(tmp_path, "\n".join(lines) + "\n"), environ={}, cwd=tmp_path)
    for name, wanted in expected.items():
        assert getattr(config.relay, name) == wanted, name


# --- [visits] -----------------------------------------------------------------------------------


def test_visits_default_to_the_six_indications_and_notice(tmp_path: Path) -> None:
    config = load_config(environ={}, cwd=tmp_path)
    assert config.visits == VisitsConfig()
    assert config.visits.consent is ConsentMode.NOTICE
    assert config.visits.codes == (
        "test-results",
        "sick-leave-closing",
        "chronic-stable-eprescription",
        "dispensary-observation",
        "therapy-control",
        "treatment-questions",
    )
    assert config.visits.indications == DEFAULT_INDICATIONS
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.visits.indications[0].code = "x"  # type: ignore[misc]


def test_a_clinic_sets_its_own_indications_and_consent(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [visits]
        consent = "explicit"
        [[visits.indications]]
        code = "test-results"
        name = "Разбор результатов анализов"
        [[visits.indications]]
        code = "wound_check-2"
        name = "Checking how a wound heals"
        """,
    )
    config = load_config(path, environ={}, cwd=tmp_path)
    assert config.visits == VisitsConfig(
        indications=(
            IndicationConfig("test-results", "Разбор результатов анализов"),
            IndicationConfig("wound_check-2", "Checking how a wound heals"),
        ),
        consent=ConsentMode.EXPLICIT,
    )
    # The environment overrides the file's consent mode.
    config = load_config(path, environ={"MEDRELAY_VISITS_CONSENT": "Notice"}, cwd=tmp_path)
    assert config.visits.consent is ConsentMode.NOTICE
    assert len(config.visits.indications) == 2


def _indications(*tables: str) -> str:
    return "".join(f"[[visits.indications]]\n{table}\n" for table in tables)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[visits]\nindications = "test-results"\n', "visits.indications: must be an array"),
        ("[visits]\nindications = []\n", "visits.indications: must list 1 to 32 indications"),
        (
            _indications(*[f'code = "c{i}"\nname = "n"' for i in range(33)]),
            "visits.indications: must list 1 to 32 indications",
        ),
        ('[visits]\nindications = ["x"]\n', "visits.indications[0]: must be a table"),
        (_indications('name = "n"'), "visits.indications[0].code: must be a string"),
        (_indications('code = "ok"'), "visits.indications[0].name: must be a string"),
        (
            _indications('code = "ok"\nname = "n"', 'code = "Bad Code"\nname = "n"'),
            "visits.indications[1].code: must be a lowercase identifier",
        ),
        (_indications('code = "-x"\nname = "n"'), "visits.indications[0].code: must be a lower"),
        (
            _indications('code = "{}"\nname = "n"'.format("a" * 65)),
            "visits.indications[0].code: must be at most 64 characters",
        ),
        (_indications('code = "ok"\nname = " "'), "visits.indications[0].name: must not be empty"),
        (
            _indications('code = "ok"\nname = "a\\nb"'),
            "visits.indications[0].name: must be one line",
        ),
        (
            _indications('code = "ok"\nname = "{}"'.format("я" * 129)),
            "visits.indications[0].name: must be at most 256 bytes",
        ),
        (
            _indications('code = "ok"\nname = "n"', 'code = "ok"\nname = "m"'),
            "visits.indications[1].code: 'ok' is listed twice",
        ),
        (
            _indications('code = "ok"\nname = "n"\ncolour = "red"'),
            "visits.indications[0].colour: unknown setting",
        ),
        ('[visits]\nconsent = "implied"\n', "visits.consent: must be one of notice, explicit"),
        ('[visits]\nconsnet = "notice"\n', "visits.consnet: unknown setting"),
    ],
)
def test_bad_visit_settings_are_one_line_naming_the_key(
    tmp_path: Path, toml: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, toml), environ={}, cwd=tmp_path)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(message)
