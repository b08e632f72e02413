"""Device profiles: built-ins, sizes, validation messages, and the `profiles` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from importlib import resources

import pytest
import tomllib

from edgestack.errors import EdgestackError, ProfileError
from edgestack.profiles import (
    FIELDS,
    Profile,
    builtin_names,
    format_size,
    list_profiles,
    load_profile,
    parse_size,
)

GiB = 1024**3
MiB = 1024**2
BUILTINS = ["arm64-phone-2gb", "ci-x86", "intel-core-laptop", "jetson-orin-nano-8gb",
            "rpi5-4gb", "x86-server"]
SIZE_EXPECTED = ("a positive number of bytes (an integer, or a string with a unit such as "
                 "'48MB' or '1.5GiB')")
ALLOWED = ("name, description, target, arch, precision, threads, memory_budget, "
           "latency_target_ms, graph_optimization, device_memory_total, notes")

GOOD = """\
name = "rpi5"
description = "test board"
target = "ort-arm"
arch = "aarch64"
precision = "fp32"
threads = 4
memory_budget = "48MB"
"""


# -- built-in profiles --------------------------------------------------------------------

def test_builtin_names_and_all_validate():
    assert builtin_names() == BUILTINS
    profiles = list_profiles()
    assert [p.name for p in profiles] == BUILTINS
    for p in profiles:
        assert isinstance(p, Profile)
        assert load_profile(p.name) == p
        assert p.source and p.source.endswith(f"{p.name}.toml")
        assert p.description.strip()
        assert p.device_memory_total is not None and p.memory_budget <= p.device_memory_total


def test_builtin_values():
    by = {p.name: p for p in list_profiles()}
    rpi = by["rpi5-4gb"]
    assert (rpi.target, rpi.arch, rpi.threads, rpi.precision) == ("ort-arm", "aarch64", 4,
                                                                   "fp32")
    assert rpi.device_memory_total == 4 * GiB and rpi.memory_budget == int(1.5 * GiB)
    assert rpi.latency_target_ms == 100.0 and isinstance(rpi.latency_target_ms, float)
    jet = by["jetson-orin-nano-8gb"]
    assert (jet.target, jet.arch, jet.precision) == ("tensorrt-gpu", "aarch64", "fp16")
    assert jet.device_memory_total == 8 * GiB and "shared" in jet.notes
    lap = by["intel-core-laptop"]
    assert (lap.target, lap.arch, lap.threads) == ("openvino-cpu", "x86_64", 4)
    assert lap.precision in ("fp32", "bf16")
    srv = by["x86-server"]
    assert (srv.target, srv.arch) == ("ort-cpu", "x86_64")
    phone = by["arm64-phone-2gb"]
    assert (phone.target, phone.arch) == ("ort-arm", "aarch64")
    assert phone.memory_budget <= 512 * MiB and phone.device_memory_total == 2 * GiB
    ci = by["ci-x86"]
    assert (ci.target, ci.arch, ci.threads, ci.device_memory_total) == ("ort-cpu", "x86_64",
                                                                         2, 24 * GiB)
    assert ci.latency_target_ms is None and ci.graph_optimization == "all"


def test_builtin_files_explain_their_numbers():
    for name in BUILTINS:
        text = (resources.files("edgestack.profiles") / f"{name}.toml").read_text("utf-8")
        comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
        assert "Where the numbers come from" in comments, name
        assert "memory_budget is a choice" in comments, name


def test_to_dict_round_trip_and_json():
    for p in list_profiles():
        d = p.to_dict()
        assert set(d) <= set(FIELDS) and {"name", "memory_budget", "threads"} <= set(d)
        assert isinstance(d["memory_budget"], int)
        assert Profile.from_dict(d) == p
        assert Profile.from_dict(json.loads(json.dumps(d))) == p
    ci = load_profile("ci-x86").to_dict()
    assert "latency_target_ms" not in ci and "notes" not in ci


def test_profile_is_frozen_and_constructor_validates():
    p = Profile(name="b", description="d", target="ort-cpu", arch="x86_64", precision="int8",
                threads=8, memory_budget="1.5GiB", latency_target_ms=10)
    assert p.memory_budget == 1610612736 and p.latency_target_ms == 10.0
    assert p.graph_optimization == "all" and p.device_memory_total is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.threads = 2  # type: ignore[misc]
    with pytest.raises(ProfileError, match=r"^profile 'b': field 'threads' must be an integer "
                       r"in 1\.\.256, found 300$"):
        Profile(name="b", description="d", target="ort-cpu", arch="x86_64",
                precision="int8", threads=300, memory_budget=1)


def test_user_profile_by_path(tmp_path):
    f = tmp_path / "rpi5.toml"
    f.write_text(GOOD + 'latency_target_ms = 12.5\ngraph_optimization = "basic"\n'
                 'device_memory_total = "4 GiB"\nnotes = "mine"\n')
    p = load_profile(str(f))
    assert p.name == "rpi5" and p.memory_budget == 48_000_000
    assert p.latency_target_ms == 12.5 and p.graph_optimization == "basic"
    assert p.device_memory_total == 4 * GiB and p.notes == "mine"
    assert p.source == str(f)
    assert load_profile(f) == p  # a Path works too


def test_unknown_profile_lists_available():
    with pytest.raises(ProfileError) as e:
        load_profile("rpi4")
    assert str(e.value) == (
        "unknown profile 'rpi4' (did you mean 'rpi5-4gb'?); built-in profiles: "
        + ", ".join(BUILTINS) + "; or give the path to a .toml file (see docs/profiles.md)")
    with pytest.raises(ProfileError, match="no such profile file .the built-in profile is "
                       "named 'ci-x86', without .toml"):
        load_profile("ci-x86.toml")
    assert issubclass(ProfileError, EdgestackError)


# -- sizes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("48MB", 48_000_000),
    ("48 MB", 48_000_000),
    ("48MiB", 48 * MiB),
    ("48mib", 48 * MiB),
    ("1.5GB", 1_500_000_000),
    ("1.5GiB", 1610612736),
    ("1.1GB", 1_100_000_000),  # decimal arithmetic: not 1_099_999_999
    ("1024", 1024),
    (1024, 1024),
    ("2kB", 2000),
    ("2KB", 2000),
    ("1 KiB", 1024),
    (" 3 TB ", 3 * 1000**4),
    ("1TiB", 1024**4),
    ("512B", 512),
    (".5KiB", 512),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("value,found,reason", [
    ("-5MB", "'-5MB'", "a size cannot be negative"),
    (-1, "-1", "a size cannot be negative"),
    ("0", "'0'", "a size must be more than 0 bytes"),
    (0, "0", "a size must be more than 0 bytes"),
    ("48XB", "'48XB'", "unknown unit 'XB'; use B, kB, MB, GB, TB (powers of 1000) or KiB, "
     "MiB, GiB, TiB (powers of 1024)"),
    ("48M", "'48M'", "unknown unit 'M'; use B, kB, MB, GB, TB (powers of 1000) or KiB, "
     "MiB, GiB, TiB (powers of 1024)"),
    ("abc", "'abc'", "not a number followed by an optional unit"),
    ("", "''", "the string is empty"),
    ("1.5", "'1.5'", "a fraction of a byte is not a size"),
    ("0.0001kB", "'0.0001kB'", "less than one byte is not a size"),
    (1.5, "1.5 (a float)", "a float is not a number of bytes; write an integer, or a string "
     "with a unit such as '1.5GB'"),
    (True, "true (a boolean)", "a boolean is not a size"),
])
def test_parse_size_errors(value, found, reason):
    with pytest.raises(ProfileError) as e:
        parse_size(value, what="--budget")
    assert str(e.value) == f"--budget must be {SIZE_EXPECTED}, found {found}: {reason}"


@pytest.mark.parametrize("n,text", [
    (0, "0 B"), (123, "123 B"), (1024, "1 KiB"), (1536, "1.5 KiB"), (2000, "2 kB"),
    (48_000_000, "48 MB"), (48 * MiB, "48 MiB"), (1_500_000_000, "1.5 GB"),
    (1610612736, "1.5 GiB"), (24 * GiB, "24 GiB"), (1024**4, "1 TiB"),
    (123456789, "117.74 MiB"), (-1024, "-1 KiB"),
])
def test_format_size(n, text):
    assert format_size(n) == text
    if n > 0 and text != "117.74 MiB":
        assert parse_size(text) == n  # exact formats read back exactly


# -- validation messages ----------------------------------------------------------------------

def _replace(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


ERROR_CASES = {
    "threads_string": (_replace("threads = 4", 'threads = "4"'),
                       "field 'threads' must be an integer in 1..256, found '4' (a string)"),
    "threads_zero": (_replace("threads = 4", "threads = 0"),
                     "field 'threads' must be an integer in 1..256, found 0"),
    "threads_too_many": (_replace("threads = 4", "threads = 257"),
                         "field 'threads' must be an integer in 1..256, found 257"),
    "threads_float": (_replace("threads = 4", "threads = 4.0"),
                      "field 'threads' must be an integer in 1..256, found 4.0 (a float)"),
    "threads_bool": (_replace("threads = 4", "threads = true"),
                     "field 'threads' must be an integer in 1..256, found true (a boolean)"),
    "missing": (_replace("threads = 4\n", ""),
                "missing required field 'threads': an integer in 1..256"),
    "missing_two": (_replace("threads = 4\n", "").replace('arch = "aarch64"\n', ""),
                    "missing required fields 'arch': one of x86_64, aarch64; 'threads': "
                    "an integer in 1..256"),
    "unknown": (GOOD + "thread = 4\n",
                f"unknown field 'thread' (did you mean 'threads'?); allowed fields: {ALLOWED}"),
    "unknown_two": (GOOD + "colour = 'red'\n[extra]\na = 1\n",
                    f"unknown fields 'colour', 'extra'; allowed fields: {ALLOWED}"),
    "bad_unit": (_replace('"48MB"', '"48XB"'),
                 f"field 'memory_budget' must be {SIZE_EXPECTED}, found '48XB': unknown unit "
                 "'XB'; use B, kB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB "
                 "(powers of 1024)"),
    "budget_negative": (_replace('"48MB"', "-1"),
                        f"field 'memory_budget' must be {SIZE_EXPECTED}, found -1: a size "
                        "cannot be negative"),
    "budget_float": (_replace('"48MB"', "48.5"),
                     f"field 'memory_budget' must be {SIZE_EXPECTED}, found 48.5 (a float): "
                     "a float is not a number of bytes; write an integer, or a string with a "
                     "unit such as '1.5GB'"),
    "total_bad": (GOOD + "device_memory_total = '4 GX'\n",
                  f"field 'device_memory_total' must be {SIZE_EXPECTED}, found '4 GX': "
                  "unknown unit 'GX'; use B, kB, MB, GB, TB (powers of 1000) or KiB, MiB, "
                  "GiB, TiB (powers of 1024)"),
    "budget_over_total": (GOOD + "device_memory_total = '32MB'\n",
                          "field 'memory_budget' (48 MB) must not exceed field "
                          "'device_memory_total' (32 MB)"),
    "syntax": (_replace("threads = 4", "threads = "),
               "not valid TOML: Invalid value (at line 6, column 11)"),
    "name_mismatch": (_replace('"rpi5"', '"rpi-5"'),
                      "field 'name' must match the file name 'rpi5', found 'rpi-5' (rename "
                      "the file to 'rpi-5.toml' or set name = \"rpi5\")"),
    "name_type": (_replace('"rpi5"', "5"),
                  "field 'name' must be a non-empty string of letters, digits, '.', '_' or "
                  "'-', found 5 (an integer)"),
    "description_empty": (_replace('"test board"', '"  "'),
                          "field 'description' must be a non-empty string, found '  '"),
    "target": (_replace('"ort-arm"', '"ort-amr"'),
               "field 'target' must be one of ort-cpu, ort-arm, openvino-cpu, tensorrt-gpu, "
               "found 'ort-amr' (did you mean 'ort-arm'?)"),
    "arch": (_replace('"aarch64"', '"arm64"'),
             "field 'arch' must be one of x86_64, aarch64, found 'arm64' (did you mean "
             "'aarch64'?)"),
    "arch_for_target": (_replace('"aarch64"', '"x86_64"'),
                        "field 'arch' must be aarch64 for target 'ort-arm', found 'x86_64' "
                        "(for an x86_64 device use target 'ort-cpu')"),
    "precision": (_replace('"fp32"', '"f32"'),
                  "field 'precision' must be one of fp32, fp16, bf16, int8, found 'f32' "
                  "(did you mean 'fp32'?)"),
    "precision_for_target": (_replace('"fp32"', '"bf16"'),
                             "field 'precision' must be one of fp32, fp16, int8 for target "
                             "'ort-arm', found 'bf16'"),
    "latency_negative": (GOOD + "latency_target_ms = -5\n",
                         "field 'latency_target_ms' must be a positive number of "
                         "milliseconds, found -5"),
    "latency_string": (GOOD + "latency_target_ms = '5ms'\n",
                       "field 'latency_target_ms' must be a positive number of "
                       "milliseconds, found '5ms' (a string)"),
    "latency_inf": (GOOD + "latency_target_ms = inf\n",
                    "field 'latency_target_ms' must be a positive number of milliseconds, "
                    "found inf"),
    "graph_optimization": (GOOD + "graph_optimization = 'max'\n",
                           "field 'graph_optimization' must be one of disable, basic, "
                           "extended, all, found 'max'"),
    "notes": (GOOD + "notes = 3\n", "field 'notes' must be a string, found 3 (an integer)"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_validation_errors(tmp_path, case):
    text, message = ERROR_CASES[case]
    f = tmp_path / "rpi5.toml"
    f.write_text(text)
    with pytest.raises(ProfileError) as e:
        load_profile(str(f))
    assert str(e.value) == f"{f}: {message}"


def test_good_fixture_loads(tmp_path):
    f = tmp_path / "rpi5.toml"
    f.write_text(GOOD)
    assert load_profile(str(f)).memory_budget == 48_000_000


def test_file_errors(tmp_path):
    with pytest.raises(ProfileError, match=r"nope\.toml: no such profile file$"):
        load_profile(str(tmp_path / "nope.toml"))
    d = tmp_path / "dir.toml"
    d.mkdir()
    with pytest.raises(ProfileError, match=r"dir\.toml: is a directory"):
        load_profile(str(d))
    f = tmp_path / "latin.toml"
    f.write_bytes(b'name = "latin"\ndescription = "caf\xe9"\n')
    with pytest.raises(ProfileError, match=r"latin\.toml: not UTF-8 text"):
        load_profile(str(f))


def test_from_dict_errors():
    good = tomllib.loads(GOOD)
    with pytest.raises(ProfileError, match=r"^mine: unknown field 'x'"):
        Profile.from_dict({**good, "x": 1}, where="mine")
    with pytest.raises(ProfileError, match=r"^profile: missing required field 'name'"):
        Profile.from_dict({k: v for k, v in good.items() if k != "name"})


# -- CLI ---------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    from edgestack.cli import profiles as cli_profiles

    parser = argparse.ArgumentParser(prog="edgestack")
    cli_profiles.add_parser(parser.add_subparsers(dest="command"))
    return parser


def _run(capsys, *argv: str) -> tuple[int, str]:
    args = _parser().parse_args(["profiles", *argv])
    code = args.run(args)
    return code, capsys.readouterr().out


def test_cli_list(capsys):
    code, out = _run(capsys, "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["name", "target", "arch", "precision", "threads", "budget",
                                "latency", "target"]
    assert set(lines[1]) == {"-", " "}
    rows = {line.split()[0]: line.split() for line in lines[2:2 + len(BUILTINS)]}
    assert list(rows) == BUILTINS
    assert rows["rpi5-4gb"] == ["rpi5-4gb", "ort-arm", "aarch64", "fp32", "4", "1.5", "GiB",
                                "100", "ms"]
    assert rows["ci-x86"] == ["ci-x86", "ort-cpu", "x86_64", "fp32", "2", "4", "GiB", "-"]
    assert "6 built-in profiles" in out


def test_cli_list_json(capsys):
    code, out = _run(capsys, "list", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["ok"] is True
    assert [p["name"] for p in doc["profiles"]] == BUILTINS
    assert [Profile.from_dict(p) for p in doc["profiles"]] == list_profiles()


def test_cli_show(capsys, tmp_path):
    code, out = _run(capsys, "show", "jetson-orin-nano-8gb")
    assert code == 0
    fields = dict(line.split(None, 1) for line in out.splitlines() if line[:1] != " ")
    assert fields["target"] == "tensorrt-gpu" and fields["precision"] == "fp16"
    assert fields["memory_budget"] == "4 GiB (4294967296 bytes)"
    assert fields["device_memory_total"] == "8 GiB (8589934592 bytes)"
    assert fields["file"].endswith("jetson-orin-nano-8gb.toml")

    f = tmp_path / "rpi5.toml"
    f.write_text(GOOD)
    code, out = _run(capsys, "show", str(f), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ok"] is True and doc["file"] == str(f)
    assert doc["profile"] == {"name": "rpi5", "description": "test board",
                              "target": "ort-arm", "arch": "aarch64", "precision": "fp32",
                              "threads": 4, "memory_budget": 48_000_000,
                              "graph_optimization": "all"}


def test_cli_show_unknown_raises_profile_error(capsys):
    args = _parser().parse_args(["profiles", "show", "nope"])
    with pytest.raises(ProfileError, match=r"^unknown profile 'nope'.*built-in profiles: "
                       r"arm64-phone-2gb, ci-x86"):
        args.run(args)


def test_cli_requires_an_action(capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["profiles"])
    assert e.value.code == 2


def test_cli_main_exit_codes(capsys, monkeypatch):
    """Through `edgestack.cli.main` (registering the module here if the lead has not yet)."""
    import edgestack.cli as cli
    from edgestack.cli import profiles as cli_profiles

    registered = cli._commands()
    if cli_profiles not in registered:
        monkeypatch.setattr(cli, "_commands", lambda: [*registered, cli_profiles])
    assert cli.main(["profiles", "show", "nope", "--json"]) == 2
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["ok"] is False and doc["error_type"] == "ProfileError"
    assert "edgestack profiles: error: unknown profile 'nope'" in captured.err
    assert cli.main(["profiles", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_import_is_light():
    code = ("import sys, edgestack.profiles, edgestack.cli.profiles; "
            "heavy = {'torch', 'numpy', 'onnx', 'onnxruntime', 'openvino', 'tensorrt'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
