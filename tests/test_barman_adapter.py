import os
import threading

import pytest

from pg_backup_api.barman_io import adapter as barman_adapter
from pg_backup_api.barman_io import commands as barman_cli
from pg_backup_api.core.errors import ConfigurationError, NoSuchServer


def test_loads_servers_from_the_conf_directory(barman_files):
    config = barman_adapter.load_config(str(barman_files.conf))
    assert config.server_names == ["pg"]
    assert config.barman_home == barman_files.home
    with pytest.raises(NoSuchServer):
        config.server("other")


def test_missing_or_broken_configuration_is_a_clear_error(barman_files, tmp_path):
    with pytest.raises(ConfigurationError, match="does not exist"):
        barman_adapter.load_config(str(tmp_path / "nope.conf"))
    (barman_files.conf_dir / "bad.conf").write_text("[barman]\nbarman_home = /elsewhere\n")
    with pytest.raises(ConfigurationError, match="not empty \\[barman\\] section"):
        barman_adapter.load_config(str(barman_files.conf))


def _bump_mtime(path):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_source_reuses_the_loaded_configuration_until_a_file_changes(barman_files):
    source = barman_adapter.ConfigSource(str(barman_files.conf))
    first = source.get()
    assert source.get() is first
    barman_files.add_server("pg2")
    second = source.get()
    assert second is not first
    assert second.server_names == ["pg", "pg2"]
    _bump_mtime(barman_files.conf)
    assert source.get() is not second


def test_source_recovers_once_a_broken_file_is_fixed(barman_files):
    source = barman_adapter.ConfigSource(str(barman_files.conf))
    good = barman_files.conf.read_text()
    barman_files.conf.write_text("not ini at all")
    with pytest.raises(ConfigurationError):
        source.get()
    barman_files.conf.write_text(good)
    _bump_mtime(barman_files.conf)
    assert source.get().server_names == ["pg"]


def test_readers_never_see_a_missing_server_while_the_configuration_reloads(barman_files):
    source = barman_adapter.ConfigSource(str(barman_files.conf))
    source.get()
    failures = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                source.get().server("pg")
            except Exception as exc:  # any failure here is the defect under test
                failures.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(30):
        barman_files.add_server(f"extra{i}")
    stop.set()
    for t in threads:
        t.join()
    assert failures == []


def test_restore_argv_passes_values_after_a_double_dash_and_never_a_shell(barman_files):
    argv = barman_cli.restore_argv("/etc/b.conf", "pg", "20261127T010000", "/srv/r", "ssh -p 2 h; x")
    assert argv[1:4] == ["-c", "/etc/b.conf", barman_cli.RESTORE_COMMAND]
    assert argv[4] == "--remote-ssh-command=ssh -p 2 h; x"
    assert argv[5:] == ["--", "pg", "20261127T010000", "/srv/r"]


BAD_SERVER = "[barman]\nbarman_home = /elsewhere\n"  # a second [barman] section: Barman refuses it


def test_a_bad_file_of_the_conf_directory_at_start_up_heals_once_removed(barman_files):
    bad = barman_files.conf_dir / "bad.conf"
    bad.write_text(BAD_SERVER)
    source = barman_adapter.ConfigSource(str(barman_files.conf))
    with pytest.raises(ConfigurationError):
        source.get()
    bad.unlink()  # the main file is untouched
    assert source.get().server_names == ["pg"]


def test_a_bad_file_added_after_a_good_load_fails_then_heals(barman_files):
    source = barman_adapter.ConfigSource(str(barman_files.conf))
    assert source.get().server_names == ["pg"]
    bad = barman_files.conf_dir / "bad.conf"
    bad.write_text(BAD_SERVER)
    with pytest.raises(ConfigurationError):
        source.get()
    bad.write_text("[pg2]\ndescription = fixed\nconninfo = host=/nonexistent\nbackup_method = postgres\n"
                   "streaming_conninfo = host=/nonexistent\nstreaming_archiver = on\nslot_name = barman\n")
    assert source.get().server_names == ["pg", "pg2"]


def test_a_bad_barman_auto_conf_at_start_up_heals_once_fixed(barman_files):
    auto = barman_files.home / ".barman.auto.conf"
    auto.write_text("[barman]\ndescription = x\n")
    source = barman_adapter.ConfigSource(str(barman_files.conf))
    with pytest.raises(ConfigurationError):
        source.get()
    auto.write_text("[pg]\ndescription = written by barman config-update\n")
    assert source.get().server_names == ["pg"]


def test_a_failed_load_is_not_retried_while_no_file_changes(barman_files, monkeypatch):
    (barman_files.conf_dir / "bad.conf").write_text(BAD_SERVER)
    source = barman_adapter.ConfigSource(str(barman_files.conf))
    loads = []
    real_load = barman_adapter.load_config
    monkeypatch.setattr(barman_adapter, "load_config", lambda path: loads.append(path) or real_load(path))
    for _ in range(5):
        with pytest.raises(ConfigurationError):
            source.get()
    assert len(loads) == 1


def test_a_failed_load_is_keyed_on_the_files_the_main_file_now_names(barman_files, tmp_path):
    source = barman_adapter.ConfigSource(str(barman_files.conf))
    assert source.get().server_names == ["pg"]
    # The main file now names another directory, which holds a bad file: the last good load's
    # files are not the ones that failed, so fixing the new directory must heal it.
    new_dir = tmp_path / "barman.d.new"
    new_dir.mkdir()
    bad = new_dir / "pg.conf"
    bad.write_text(BAD_SERVER)
    barman_files.conf.write_text(barman_files.conf.read_text().replace(str(barman_files.conf_dir), str(new_dir)))
    with pytest.raises(ConfigurationError):
        source.get()
    bad.write_text((barman_files.conf_dir / "pg.conf").read_text().replace("[pg]", "[pg3]"))
    assert source.get().server_names == ["pg3"]
