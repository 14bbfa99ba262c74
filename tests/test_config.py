"""Configuration: defaults, then the INI file, then the flags."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import dnsrouter
from dnsrouter import config as configuration
from dnsrouter.address import Address
from dnsrouter.cli import main
from dnsrouter.errors import ConfigError
from dnsrouter.settings import SETTINGS


def _load(*argv: str):
    args = configuration.build_parser().parse_args(list(argv))
    return configuration.load(args), args


def _ini(tmp_path, text: str, name: str = "dnsrouter.ini") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return str(path)


def _error(path: str) -> str:
    with pytest.raises(ConfigError) as info:
        configuration.read_file(path)
    return str(info.value)


def test_defaults():
    config, _ = _load()
    assert config.server_listen == (Address("127.0.0.1", 53),)
    assert config.server_workers == len(os.sched_getaffinity(0))
    assert config.server_user is None
    assert config.server_pidfile is None
    assert config.server_tcp_connections == 256
    assert config.server_tcp_idle_timeout == 10.0
    assert config.registry_etcd == ("http://127.0.0.1:2379",)
    assert config.registry_prefix == "/dnsrouter/"
    assert config.registry_routes_dir is None
    assert config.health_interval == 2.0
    assert config.health_timeout == 1.0
    assert config.health_fall == 3
    assert config.health_rise == 2
    assert config.forward_timeout == 1.0
    assert config.metrics_listen is None
    assert config.log_level == "info"
    assert config.config_file is None


def test_ini_overrides_defaults(tmp_path):
    path = _ini(tmp_path, """
        # comment
        [server]
        listen = [::1]:5353 127.0.0.1:5353
        workers = 3

        [registry]
        etcd = http://10.0.0.1:2379/, https://10.0.0.2:2379
        prefix = /routes

        [health]
        interval = 0.5
        fall = 5

        [metrics]
        listen = 127.0.0.1:9100

        [log]
        level = DEBUG
        """)
    config, _ = _load("--config", path)
    assert config.config_file == path
    assert config.server_listen == (Address("::1", 5353), Address("127.0.0.1", 5353))
    assert config.server_workers == 3
    assert config.registry_etcd == ("http://10.0.0.1:2379", "https://10.0.0.2:2379")
    assert config.registry_prefix == "/routes/"
    assert config.health_interval == 0.5
    assert config.health_fall == 5
    assert config.health_rise == 2  # not in the file: default
    assert config.metrics_listen == Address("127.0.0.1", 9100)
    assert config.log_level == "debug"


def test_flags_override_ini(tmp_path):
    (tmp_path / "from-file").mkdir()
    (tmp_path / "from-flag").mkdir()
    path = _ini(tmp_path, f"""
        [server]
        listen = 127.0.0.1:5353
        workers = 3
        [registry]
        routes_dir = {tmp_path}/from-file
        [log]
        level = error
        """)
    config, _ = _load("--config", path, "--workers", "5", "--routes-dir", f"{tmp_path}/from-flag",
                      "--log-level", "warning", "--metrics", "[::1]:9100")
    assert config.server_workers == 5
    assert config.registry_routes_dir == f"{tmp_path}/from-flag"
    assert config.log_level == "warning"
    assert config.metrics_listen == Address("::1", 9100)
    assert config.server_listen == (Address("127.0.0.1", 5353),)  # no flag: the file's


def test_listen_twice_gives_two_addresses(tmp_path):
    path = _ini(tmp_path, "[server]\nlisten = 10.0.0.1:53\n")
    config, _ = _load("--config", path, "--listen", "127.0.0.1:5300", "--listen", "[::1]:5300")
    assert config.server_listen == (Address("127.0.0.1", 5300), Address("::1", 5300))


def test_workers_auto_and_bad_flag():
    config, _ = _load("--workers", "auto")
    assert config.server_workers == len(os.sched_getaffinity(0))
    for bad in ("0", "-1", "many", "2000"):
        with pytest.raises(ConfigError) as info:
            _load("--workers", bad)
        assert "--workers" in str(info.value)


def test_unknown_section_has_file_and_line(tmp_path):
    path = _ini(tmp_path, """
        [server]
        workers = 2

        [bogus]
        x = 1
        """)
    message = _error(path)
    assert f"{path}:4:" in message
    assert "bogus" in message


def test_unknown_key_has_file_and_line(tmp_path):
    path = _ini(tmp_path, """
        [server]
        workers = 2

        [health]
        interval = 3
        intervall = 4
        """)
    message = _error(path)
    assert f"{path}:6:" in message
    assert "intervall" in message


def test_same_key_in_another_section_points_at_the_right_line(tmp_path):
    # [forward] timeout is bad; [health] timeout above it is fine.
    path = _ini(tmp_path, """
        [health]
        timeout = 1

        [forward]
        timeout = nope
        """)
    message = _error(path)
    assert f"{path}:5:" in message
    assert "timeout" in message


@pytest.mark.parametrize("text, line, words", [
    ("[server]\nworkers = -1\n", 2, ["workers", "-1"]),
    ("[server]\nuser = x\nlisten = nonsense\n", 3, ["listen", "nonsense"]),
    ("[server]\nlisten = localhost:53\n", 2, ["localhost"]),
    ("[log]\n\nlevel = loud\n", 3, ["level", "loud"]),
    ("[health]\nrise: 0\n", 2, ["rise"]),
    ("[registry]\netcd = ftp://x\n", 2, ["etcd"]),
    ("[metrics]\nlisten = 1.2.3.4:99999\n", 2, ["listen"]),
    ("[server]\n\nudp_receive_buffer = 4096\n", 3, ["udp_receive_buffer", "65536-536870912"]),
])
def test_bad_value_has_file_and_line(tmp_path, text, line, words):
    path = _ini(tmp_path, text)
    message = _error(path)
    assert f"{path}:{line}:" in message
    for word in words:
        assert word in message
    with pytest.raises(ConfigError):
        _load("--config", path)


def test_commented_section_header_still_gives_the_line(tmp_path):
    # Inline comments are allowed (inline_comment_prefixes), on headers too.
    path = _ini(tmp_path, """
        [server]   # the listening side
        workers = -1
        """)
    assert f"{path}:2:" in _error(path)
    path = _ini(tmp_path, """
        [server]
        workers = 2
        [bogus] ; typo
        """, name="other.ini")
    assert f"{path}:3:" in _error(path)


def test_unreadable_and_malformed_files(tmp_path):
    missing = str(tmp_path / "nope.ini")
    assert missing in _error(missing)
    path = _ini(tmp_path, "workers = 2\n", name="noheader.ini")
    assert path in _error(path)
    path = _ini(tmp_path, "[server]\nworkers = 2\nworkers = 3\n", name="dup.ini")
    message = _error(path)
    assert path in message and "workers" in message


def test_describe_round_trips(tmp_path):
    path = _ini(tmp_path, f"""
        [server]
        listen = [::1]:5353 127.0.0.1:5353
        workers = 3
        [registry]
        routes_dir = {tmp_path}
        [health]
        interval = 0.5
        [log]
        level = debug
        """)
    config, _ = _load("--config", path)
    described = _ini(tmp_path, configuration.describe(config), name="described.ini")
    again, _ = _load("--config", described)
    assert again == configuration.Config(**{**vars(config), "config_file": described})


@pytest.mark.parametrize("address", ["127.0.0.1:9100", "[::1]:9100"])
def test_describe_metrics_listen(tmp_path, address):
    # metrics_listen is one Address (a NamedTuple), not a tuple of them.
    path = _ini(tmp_path, f"[metrics]\nlisten = {address}\n")
    config, _ = _load("--config", path)
    text = configuration.describe(config)
    assert f"[metrics]\nlisten = {address}\n" in text
    described = _ini(tmp_path, text, name="described.ini")
    again, _ = _load("--config", described)
    assert again.metrics_listen == config.metrics_listen


def test_describe_round_trips_several_etcd_urls(tmp_path):
    path = _ini(tmp_path, "[registry]\netcd = http://10.0.0.1:2379, http://10.0.0.2:2379\n")
    config, _ = _load("--config", path)
    described = _ini(tmp_path, configuration.describe(config), name="described.ini")
    again, _ = _load("--config", described)
    assert again.registry_etcd == ("http://10.0.0.1:2379", "http://10.0.0.2:2379")


def test_describe_hides_password(tmp_path):
    path = _ini(tmp_path, "[registry]\nusername = root\npassword = s3cret\n")
    config, _ = _load("--config", path)
    assert config.registry_password == "s3cret"
    text = configuration.describe(config)
    assert "s3cret" not in text
    assert "password = ********" in text
    assert "username = root" in text


def test_reload_live_and_restart(tmp_path):
    path = _ini(tmp_path, """
        [server]
        listen = 127.0.0.1:5300
        workers = 2
        [health]
        interval = 2
        [log]
        level = info
        """)
    config, args = _load("--config", path)
    same, applied, restart = configuration.reload(config, args)
    assert (applied, restart) == ([], [])
    assert same == config

    _ini(tmp_path, """
        [server]
        listen = 127.0.0.1:5301
        workers = 4
        [health]
        interval = 5
        fall = 7
        [log]
        level = debug
        """)
    new, applied, restart = configuration.reload(config, args)
    assert applied == ["[health] interval", "[health] fall", "[log] level"]
    assert restart == ["[server] listen", "[server] workers"]
    assert new.health_interval == 5.0
    assert new.health_fall == 7
    assert new.log_level == "debug"
    # What needs a restart keeps its running value.
    assert new.server_workers == 2
    assert new.server_listen == (Address("127.0.0.1", 5300),)
    assert new.config_file == path


def test_reload_flags_still_win(tmp_path):
    path = _ini(tmp_path, "[server]\nworkers = 2\n[log]\nlevel = info\n")
    config, args = _load("--config", path, "--workers", "6", "--log-level", "error")
    _ini(tmp_path, "[server]\nworkers = 3\n[log]\nlevel = debug\n")
    new, applied, restart = configuration.reload(config, args)
    assert (applied, restart) == ([], [])
    assert new.server_workers == 6
    assert new.log_level == "error"


def test_reload_bad_file_raises(tmp_path):
    path = _ini(tmp_path, "[server]\nworkers = 2\n")
    config, args = _load("--config", path)
    _ini(tmp_path, "[server]\nworkers = zero\n")
    with pytest.raises(ConfigError) as info:
        configuration.reload(config, args)
    assert f"{path}:2:" in str(info.value)


def test_main_check_config_in_process(tmp_path, capsys):
    good = _ini(tmp_path, "[server]\nworkers = 3\n")
    assert main(["--config", good, "--check-config"]) == 0
    assert "workers = 3" in capsys.readouterr().out
    assert main(["--check-config", "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err


# -- the command as a subprocess ------------------------------------------------

def _run(tmp_path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dnsrouter", *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.system
def test_check_config_subprocess(tmp_path):
    (tmp_path / "routes").mkdir()
    _ini(tmp_path, """
        [server]
        listen = 127.0.0.1:5300
        workers = 2
        [registry]
        routes_dir = routes
        """, name="good.ini")
    _ini(tmp_path, """
        [server]
        listen = 127.0.0.1:5300

        [healthcheck]
        interval = 1
        """, name="bad.ini")

    good = _run(tmp_path, "--config", "good.ini", "--check-config")
    assert good.returncode == 0, good.stderr
    assert "workers = 2" in good.stdout
    assert "listen = 127.0.0.1:5300" in good.stdout
    assert "routes_dir = routes" in good.stdout

    bad = _run(tmp_path, "--config", "bad.ini", "--check-config")
    assert bad.returncode == 2
    assert "bad.ini:4:" in bad.stderr
    assert "healthcheck" in bad.stderr
    assert bad.stdout == ""


@pytest.mark.system
def test_version_subprocess(tmp_path):
    result = _run(tmp_path, "--version")
    assert result.returncode == 0
    first, second = result.stdout.splitlines()
    assert first == f"dnsrouter {dnsrouter.__version__}"
    assert second == "fast path: on"  # the test install builds it (scripts/bootstrap.sh installs gcc)
    off = _run(tmp_path, "--version", "--fast-path", "off")
    assert off.stdout.splitlines()[1] == "fast path: off: [server] fast_path = off"
    (tmp_path / "off.ini").write_text("[server]\nfast_path = off\n")
    assert _run(tmp_path, "--version", "--config", "off.ini").stdout.splitlines()[1] == \
        "fast path: off: [server] fast_path = off"


def test_a_routes_dir_that_does_not_exist_stops_the_start(tmp_path):
    with pytest.raises(ConfigError, match="is not a directory"):
        _load("--routes-dir", str(tmp_path / "typo"))
    assert _load("--routes-dir", str(tmp_path))[0].registry_routes_dir == str(tmp_path)


def test_the_documented_example_parses_and_names_every_setting():
    from dnsrouter.settings import SETTINGS

    example = os.path.join(os.path.dirname(__file__), "..", "conf", "dnsrouter.ini")
    configuration.read_file(example)
    text = open(example, encoding="utf-8").read()
    for setting in SETTINGS:
        assert f"[{setting.section}]" in text
        assert f"{setting.key} =" in text, f"[{setting.section}] {setting.key} is not documented"


def test_help_writes_values_as_a_person_reads_them():
    # argparse's default metavar is the dest in capitals: SERVER_LISTEN.
    text = configuration.build_parser().format_help()
    for setting in SETTINGS:
        assert setting.name.upper() not in text
    for shown in ("--listen ADDR:PORT", "--workers N|auto", "--etcd URL[,URL...]", "--routes-dir DIR",
                  "--log-level LEVEL", "--metrics ADDR:PORT", "--user USER", "--pidfile FILE"):
        assert shown in text, shown



def test_cache_settings_and_their_bad_values(tmp_path):
    path = _ini(tmp_path, """
        [cache]
        size = 5000
        max_ttl = 86400
        max_negative_ttl = 60
        notify_allow = 192.0.2.0/28, 2001:db8::1
        """)
    config, _ = _load("--config", path, "--cache-size", "7000")
    assert (config.cache_size, config.cache_max_ttl, config.cache_max_negative_ttl) == (7000, 86400, 60)
    assert [str(n) for n in config.cache_notify_allow] == ["192.0.2.0/28", "2001:db8::1/128"]
    assert _load()[0].cache_size == 0  # off unless asked for
    for bad in ("-1", "lots"):
        with pytest.raises(ConfigError, match="--cache-size"):
            _load("--cache-size", bad)
    for line, says in (("max_ttl = 0", "[cache] max_ttl"), ("max_negative_ttl = 3000000000", "max_negative_ttl"),
                       ("notify_allow = ns1.example.com", "not an address or network")):
        assert says in _error(_ini(tmp_path, f"[cache]\n{line}\n", name="bad.ini"))


def test_limits_and_rrl_settings_and_their_bad_values(tmp_path):
    path = _ini(tmp_path, """
        [forward]
        no_route = REFUSED
        [limits]
        client_qps = 2000
        exempt = 192.0.2.0/24
        [rrl]
        responses_per_second = 5
        errors_per_second = 0
        window = 30
        """)
    config, _ = _load("--config", path, "--rrl", "10")
    assert (config.forward_no_route, config.limits_client_qps, config.limits_burst) == ("refused", 2000, 0)
    assert (config.rrl_responses_per_second, config.rrl_nxdomains_per_second, config.rrl_errors_per_second,
            config.rrl_slip, config.rrl_window) == (10, None, 0, 2, 30)
    assert [str(n) for n in config.limits_exempt] == ["192.0.2.0/24"]
    defaults = _load()[0]
    assert (defaults.forward_no_route, defaults.limits_client_qps, defaults.rrl_responses_per_second) == \
        ("servfail", 0, 0)  # off unless asked for
    for flag, bad in (("--client-qps", "-1"), ("--client-qps", "200000000"), ("--rrl", "many"),
                      ("--no-route", "nxdomain")):
        with pytest.raises(ConfigError, match=flag):
            _load(flag, bad)
    for section, line, says in (("limits", "ipv6_prefix = 65", "[limits] ipv6_prefix"),
                                ("limits", "table_size = 10", "[limits] table_size"),
                                ("rrl", "slip = 11", "[rrl] slip"), ("rrl", "window = 0", "[rrl] window"),
                                ("rrl", "exempt = resolvers", "not an address or network")):
        assert says in _error(_ini(tmp_path, f"[{section}]\n{line}\n", name="bad.ini"))
