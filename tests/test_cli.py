"""The `carddeck` command itself: version, help, and one-line messages instead of tracebacks."""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import carddeck
from carddeck.commands import cli
from carddeck.serving.settings import Settings
from tests.servers import make_deck

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {f.name for f in dataclasses.fields(Settings)}


def run_cli(*args: str, code: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    """``carddeck ARGS`` in a fresh interpreter; ``code`` runs first (e.g. to hide a module)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDDECK_")}
    env["PYTHONPATH"] = str(ROOT)
    script = f"import sys\n{code}\nfrom carddeck.commands.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout
    )


def test_version():
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"carddeck {carddeck.__version__}"


def _parsers(parser: argparse.ArgumentParser, path: str = "carddeck"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_help_shows_the_defaults(command):
    """Every option with a default worth stating shows it in --help (the serve flags through their own text)."""
    parser = cli._parser(command)
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for path, p in _parsers(sub.choices[command], f"carddeck {command}"):
        text = " ".join(p.format_help().split())
        for action in p._actions:
            default = action.default
            if not action.option_strings or default in (None, False, "", argparse.SUPPRESS) or action.help is None:
                if command == "serve" and action.dest in SETTINGS:  # defaults come from Settings, in the help text
                    assert "default" in (action.help or ""), (path, action.dest)
                continue
            assert f"default: {default}" in text or "default" in action.help, (path, action.dest, default)


def test_compress_help_needs_no_torch():
    """The command lives outside carddeck.compress (whose import needs torch): its help reads without the extra."""
    out = run_cli("compress", "--help", code="sys.modules['torch'] = None  # as if torch were not installed")
    assert out.returncode == 0, out.stderr
    assert "--method" in out.stdout and "dipgo" in out.stdout


@pytest.mark.parametrize(
    "args", [["export", "x/card.pt", "--out", "x/model.onnx"], ["compress", "--arch", "r", "--out", "x"]]
)
def test_a_command_that_needs_torch_says_which_extra_to_install(args):
    out = run_cli(*args, code="sys.modules['torch'] = None  # as if torch were not installed")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "needs the [train] extra" in line and "'torch'" in line and "carddeck[train]" in line


def _held_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize(
    ("flag", "other"),
    [
        ("--port", ("--metrics-port", "-1", "--http-port", "-1")),
        ("--metrics-port", ("--port", "0", "--http-port", "-1")),
        ("--http-port", ("--port", "0", "--metrics-port", "-1")),
    ],
)
def test_a_port_clash_is_one_line_naming_the_port_and_the_flag(tmp_path, flag, other):
    deck = make_deck(tmp_path / "deck")
    with _held_port() as held:
        port = held.getsockname()[1]
        out = run_cli("serve", "--deck", str(deck), flag, str(port), *other)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, out.stderr[-3000:]
    assert str(port) in errors[0] and flag in errors[0], errors[0]


def test_an_unreadable_file_is_one_line(tmp_path):
    for dest in (tmp_path / "file" / "deck", tmp_path / "file"):  # a file on the path, or in the deck's place
        out = run_cli("deck", "init", str(dest), code=f"open({str(tmp_path / 'file')!r}, 'w')")
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert out.stderr.startswith("carddeck: error: ") and len(out.stderr.strip().splitlines()) == 1
        assert "[Errno" not in out.stderr and f"deck directory {dest}" in out.stderr, out.stderr


def test_calibrate_refuses_a_read_only_deck_before_working(tmp_path):
    deck = make_deck(tmp_path / "deck")
    (deck / "READ-ONLY").write_text("shipped")
    manifest = (deck / "manifest.json").read_bytes()
    out = run_cli("calibrate", "--deck", str(deck), "--data", "digits32", timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "read-only" in line and "carddeck deck init DIR" in line
    assert (deck / "manifest.json").read_bytes() == manifest


def test_no_server_there_is_one_line_with_the_hint_and_exit_1_for_predict_too():
    """The client's typed errors reach the commands (which import no grpc): a server that is not there is one
    line, once for all files, saying what to check (tests/client has the same for ``deck list``). Mutant: the
    command catching nothing of the client's (the error would reach the dispatcher: exit 2, no hint)."""
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = run_cli("predict", "x.npy", "y.npy", "--server", f"127.0.0.1:{port}", "--timeout", "5")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("carddeck: error: UNAVAILABLE: "), lines
    assert "is `carddeck serve` running there?" in lines[0]


def test_a_dataset_that_needs_the_train_extra_says_to_install_it_pinned():
    """Mutant: the advice without constraints.txt (an unpinned torch pulls several GB of CUDA wheels), unlike
    the same advice for a command that needs torch."""
    out = run_cli("corrupt", "--data", "digits32", "--split", "test", "--out", "x",
                  code="sys.modules['sklearn'] = None  # as if scikit-learn were not installed")  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert "needs scikit-learn" in line and 'pip install -c constraints.txt "carddeck[train]"' in line, line
