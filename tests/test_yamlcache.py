"""peerkit.yamlcache: the parsed config is reused only for the exact same text."""

from __future__ import annotations

import datetime as dt
import json
import os

import pytest

from peerkit import config, yamlcache


def _counting(result):
    calls = []

    def parse(text):
        calls.append(text)
        return result(text) if callable(result) else result
    return parse, calls


def test_second_read_of_the_same_text_does_not_parse(tmp_path):
    path = tmp_path / "config.yaml"
    parse, calls = _counting({"name": "alpha", "ssh": {"port": 22}})
    assert yamlcache.load(path, "name: alpha\n", parse) == {"name": "alpha", "ssh": {"port": 22}}
    assert yamlcache.load(path, "name: alpha\n", parse) == {"name": "alpha", "ssh": {"port": 22}}
    assert len(calls) == 1
    assert os.stat(yamlcache.cache_path(path)).st_mode & 0o777 == 0o600


def test_changed_text_is_parsed_again(tmp_path):
    path = tmp_path / "config.yaml"
    parse, calls = _counting(lambda text: {"name": text.split()[-1]})
    yamlcache.load(path, "name: alpha\n", parse)
    assert yamlcache.load(path, "name: betaa\n", parse) == {"name": "betaa"}
    assert len(calls) == 2


def test_a_cache_whose_text_differs_by_one_byte_is_ignored(tmp_path):
    path = tmp_path / "config.yaml"
    forged = {"peerkit": yamlcache.__version__, "text": "name: alpha \n", "data": {"name": "evil"}}
    yamlcache.cache_path(path).write_text(json.dumps(forged))
    os.chmod(yamlcache.cache_path(path), 0o600)
    parse, _ = _counting({"name": "alpha"})
    assert yamlcache.load(path, "name: alpha\n", parse) == {"name": "alpha"}


@pytest.mark.parametrize("mode", [0o620, 0o602])
def test_a_cache_others_could_write_is_ignored(tmp_path, mode):
    path = tmp_path / "config.yaml"
    planted = {"peerkit": yamlcache.__version__, "text": "name: alpha\n", "data": {"name": "evil"}}
    yamlcache.cache_path(path).write_text(json.dumps(planted))
    os.chmod(yamlcache.cache_path(path), mode)
    parse, calls = _counting({"name": "alpha"})
    assert yamlcache.load(path, "name: alpha\n", parse) == {"name": "alpha"}
    assert calls


def test_a_symlinked_cache_is_not_followed(tmp_path):
    path = tmp_path / "config.yaml"
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"peerkit": yamlcache.__version__, "text": "x: 1\n", "data": {"x": 2}}))
    os.chmod(target, 0o600)
    yamlcache.cache_path(path).symlink_to(target)
    parse, _ = _counting({"x": 1})
    assert yamlcache.load(path, "x: 1\n", parse) == {"x": 1}


def test_torn_cache_falls_back_to_parsing(tmp_path):
    path = tmp_path / "config.yaml"
    yamlcache.cache_path(path).write_text('{"peerkit": "0.1.0", "te')
    os.chmod(yamlcache.cache_path(path), 0o600)
    parse, calls = _counting({"x": 1})
    assert yamlcache.load(path, "x: 1\n", parse) == {"x": 1}
    assert calls


@pytest.mark.parametrize("value", [dt.date(2030, 1, 1), {1: "a"}, {"a": {1, 2}}, float("nan"), b"raw"])
def test_values_json_cannot_carry_are_never_cached(tmp_path, value):
    path = tmp_path / "config.yaml"
    parse, calls = _counting({"v": value})
    yamlcache.load(path, "v: x\n", parse)
    yamlcache.load(path, "v: x\n", parse)
    assert len(calls) == 2
    assert not yamlcache.cache_path(path).exists()


def test_bool_and_float_keep_their_types(tmp_path):
    path = tmp_path / "config.yaml"
    parse, _ = _counting({"a": True, "b": 1.0, "c": 1})
    yamlcache.load(path, "t\n", parse)
    again = yamlcache.load(path, "t\n", parse)
    assert [type(again[k]) for k in "abc"] == [bool, float, int]


def test_read_only_directory_just_means_no_cache(tmp_path):
    directory = tmp_path / "ro"
    directory.mkdir()
    config_path = directory / "config.yaml"
    if os.geteuid() == 0:
        # Root writes anywhere (and CI runs as root): a directory where the
        # cache file goes makes the write fail instead.
        yamlcache.cache_path(config_path).mkdir()
    else:
        os.chmod(directory, 0o500)
    try:
        parse, calls = _counting({"x": 1})
        assert yamlcache.load(config_path, "x: 1\n", parse) == {"x": 1}
        assert yamlcache.load(config_path, "x: 1\n", parse) == {"x": 1}
        assert len(calls) == 2  # nothing was cached
    finally:
        os.chmod(directory, 0o700)
    # No temporary file left behind either.
    left = [".config.yaml.parsed.json"] if os.geteuid() == 0 else []
    assert sorted(os.listdir(directory)) == left


def test_read_config_through_the_cache_equals_a_fresh_parse(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("name: alpha\nssh: {user: peer, host: alpha.example, port: 2222}\nlimits: {max_app_bytes: 4096}\n")
    first = config.read_config(path)
    assert yamlcache.cache_path(path).exists()
    second = config.read_config(path)
    assert second == first == config.import_config(path.read_text(), path)
    assert second.ssh.port == 2222 and second.max_app_bytes == 4096


def test_an_edited_config_is_read_as_edited(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("name: alpha\nssh: {user: peer, host: alpha.example}\n")
    config.read_config(path)
    path.write_text("name: gamma\nssh: {user: peer, host: alpha.example}\n")
    assert config.read_config(path).name == "gamma"


def test_duplicate_keys_are_refused_on_every_read(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("name: alpha\nname: beta\n")
    for _ in range(2):
        with pytest.raises(config.ConfigError, match="duplicate key"):
            config.read_config(path)
    assert not yamlcache.cache_path(path).exists()
