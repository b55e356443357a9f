"""The README's first ten minutes, as a new user lives them: CI runs this after the test command.

    python tests/tour/run_tour.py [--venv DIR] [--keep]

1. creates a fresh virtualenv and runs the install part of the README's first set-up command in it
   (`pip install -c constraints.txt .`: the package WITHOUT extras, so no torch, no dev tools);
2. starts that virtualenv's `carddeck serve` (the rest of the first command);
3. runs every command of the README's tour, in order, in a scratch directory holding this clone's
   `models/` (the tour's files), with only the virtualenv on PATH and no PYTHONPATH: a command ending
   in `&` is a server, and a new server first stops the one before (as the tour says to);
4. checks what each command must show, and a few things a new user meets in the first minutes
   (`carddeck --version`, a command that needs the [train] extra, an admin call on the read-only
   default deck, for which the first server also gets an admin token in its environment): one-line
   messages, never a traceback.

The commands run verbatim when ports 8001 and 8002 are free; when another process holds them (a shared
dev machine) the tour's ports are replaced by free ones, and the run says so. Exit status 0 when every
step passed; each step prints its time.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DEFAULT_PORTS = (8000, 8001, 8002)
START_TIMEOUT_S = 120.0
TOKEN = "secret"  # the tour's admin token; the first server gets it in its environment for the read-only check


# -- the README --------------------------------------------------------------------------------------
def bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def setup_command(text: str) -> tuple[str, str]:
    """The first set-up command split into its install part and its serve part."""
    first = bash_blocks(text)[0]
    install, serve = (part.strip() for part in first.split("&&"))
    if not install.startswith("pip install") or "[" in install:
        raise SystemExit(f"README's first command should install the package without extras, got: {install}")
    return install, serve


def tour_commands(text: str) -> list[str]:
    """Every command line of the bash blocks in the README's "A short tour" section, comments removed."""
    section = text.split("## A short tour", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in bash_blocks(section):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def prose_after(text: str, command: str) -> str:
    """The README's prose right after the bash block holding ``command`` (up to the next code block): what it
    says that command shows."""
    blocks = list(re.finditer(r"```(\w*)\n(.*?)```", text, flags=re.S))
    for block, following in zip(blocks, [*blocks[1:], None]):
        if block.group(1) == "bash" and command in block.group(2):
            return text[block.end() : following.start() if following else len(text)]
    raise SystemExit(f"no bash block in the README holds {command!r}")


def serving_python_blocks(text: str) -> list[str]:
    """The Python blocks of the README's Serving section: clients of a live server (gRPC, HTTP, Triton's)."""
    section = text.split("### Serving", 1)[1].split("\n### ", 1)[0]
    return [b.strip() for b in re.findall(r"```python\n(.*?)```", section, flags=re.S)]


def wrong_samples(stdout: str) -> set[str]:
    """The samples (file names up to ``-label``) that `carddeck predict` got wrong."""
    wrong = set()
    for path, predicted in re.findall(r"^(\S+\.png): (\S+) \(", stdout, flags=re.M):
        stem, label = re.fullmatch(r"(.+)-label(\d+)", Path(path).stem).groups()
        if predicted != label:
            wrong.add(stem)
    return wrong


def prose_mismatch(prose: str, stdout: str, samples: list[Path]) -> str:
    """ "" when the samples the prose names (in backticks) are exactly those the output got wrong."""
    stems = {re.sub(r"-label\d+$", "", p.stem) for p in samples}
    named = {t for t in re.findall(r"`([^`\s]+)`", prose) if t in stems}
    wrong = wrong_samples(stdout)
    return "" if named == wrong else f"the README names {sorted(named)} wrong; the output got {sorted(wrong)} wrong"


def printed_mismatch(code: str, stdout: str) -> str:
    """ "" when each ``print(...)  # expected`` line of a README block printed what its comment says ("..."
    stands for anything), in order."""
    lines = stdout.splitlines()
    for expected in re.findall(r"^\s*print\(.*\)\s+#\s*(.+)$", code, flags=re.M):
        pattern = ".*".join(re.escape(part.strip()) for part in expected.split("..."))
        if not any(re.fullmatch(pattern, line.strip()) for line in lines):
            return f"nothing printed matches the README's comment {expected!r}; it printed: {stdout[-500:]!r}"
    return ""


# -- running -----------------------------------------------------------------------------------------
def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Tour:
    venv: Path
    work: Path
    ports: dict[int, int] = field(default_factory=dict)  # tour port -> port used (identity when free)
    server: subprocess.Popen | None = None
    server_log: Path | None = None
    added: list[str] = field(default_factory=list)  # cards `deck add` reported
    failures: list[str] = field(default_factory=list)
    timings: list[tuple[str, float]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CARDDECK_", "PYTHON", "VIRTUAL_ENV"))}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.venv)
        return env

    def localize(self, command: str) -> str:
        """The command with the tour's ports replaced by the ones used here (a no-op when they were free)."""
        if not self.ports:
            return command
        for tour_port, port in self.ports.items():
            command = re.sub(rf"(?<=[:\s]){tour_port}\b", str(port), command)
        if re.search(r"\bcarddeck serve\b", command) and "--port" not in command:  # it would take 8001, 8002
            flags = f" --port {self.ports[8001]} --http-port {self.ports[8000]} --metrics-port {self.ports[8002]}"
            background = command.endswith("&")
            command = command.rstrip("&").rstrip() + flags + (" &" if background else "")
        return command

    def check(self, ok: bool, what: str) -> None:
        print(f"    {'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            self.failures.append(what)

    def run(self, command: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        start = time.perf_counter()
        print(f"$ {command}", flush=True)
        result = subprocess.run(
            ["bash", "-c", command], cwd=cwd or self.work, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        elapsed = time.perf_counter() - start
        self.timings.append((command, elapsed))
        out = (result.stdout + result.stderr).rstrip()
        print("    " + "\n    ".join(out.splitlines()[-20:]) if out else "    (no output)", flush=True)
        print(f"    exit {result.returncode} in {elapsed:.1f} s", flush=True)
        self.check("Traceback" not in out, "no Python traceback")
        return result

    def start_server(self, command: str, env: dict[str, str] | None = None) -> None:
        self.stop_server()  # the tour: stop the first server before starting the second
        start = time.perf_counter()
        print(f"$ {command}", flush=True)
        self.server_log = self.work / f"server-{len(self.timings)}.log"
        words = shlex.split(command.rstrip("&"))
        assignments = dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w))
        argv = words[len(assignments) :]  # the server itself, so that Ctrl-C (SIGINT) reaches it
        argv[0] = shutil.which(argv[0], path=self.env["PATH"]) or argv[0]
        with open(self.server_log, "wb") as log:
            self.server = subprocess.Popen(
                argv,
                cwd=self.work,
                env={**self.env, **(env or {}), **assignments},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        text = ""
        while time.monotonic() < deadline and self.server.poll() is None:
            text = self.server_log.read_text(errors="replace")
            if re.search(r"serving deck .* on \S+:\d+", text):
                break
            time.sleep(0.2)
        started = re.search(r"serving deck .* on \S+:\d+", text)
        elapsed = time.perf_counter() - start
        self.timings.append((command, elapsed))
        print(f"    {started.group(0) if started else text[-2000:]}\n    started in {elapsed:.1f} s", flush=True)
        self.check(started is not None, f"`{command}` starts serving")

    def stop_server(self) -> None:
        if self.server is None or self.server.poll() is not None:
            return
        self.server.send_signal(signal.SIGINT)  # Ctrl-C in the server's shell
        try:
            code = self.server.wait(60)
        except subprocess.TimeoutExpired:
            self.server.kill()
            code = self.server.wait(10)
        log = self.server_log.read_text(errors="replace") if self.server_log else ""
        self.check(code == 0 and "Traceback" not in log, f"the server stops cleanly on Ctrl-C (exit {code})")


def expect_tour_output(tour: Tour, command: str, result: subprocess.CompletedProcess, readme_command: str) -> None:
    """What each kind of tour command must show, beyond exit status 0 (``readme_command``: as the README has it)."""
    tour.check(result.returncode == 0, f"exit status 0 (got {result.returncode})")
    if " predict " in f" {command} ":
        samples = sorted((tour.work / "models" / "samples").glob("*.png"))
        lines = [line for line in result.stdout.splitlines() if "distance to" in line]
        tour.check(len(lines) == len(samples) > 0, f"one prediction line per sample ({len(lines)}/{len(samples)})")
        mismatch = prose_mismatch(prose_after(README.read_text(), readme_command), result.stdout, samples)
        tour.check(not mismatch, mismatch or "the text after the command names the samples it gets wrong")
    if " deck init " in f" {command} ":
        tour.check("created" in result.stdout, "`deck init` says what it created")
    if " deck add " in f" {command} ":
        added = re.findall(r"^added (\S+/\d+)", result.stdout, flags=re.M)
        tour.check(bool(added), "`deck add` names the card added")
        tour.added += added
    if " deck list " in f" {command} ":
        for key in tour.added:
            tour.check(key in result.stdout, f"`deck list` lists the added card {key}")


def first_minutes(tour: Tour, address: str) -> None:
    """What a new user meets next to the tour: one-line messages, never a traceback."""
    version = tour.run("carddeck --version")
    tour.check(version.returncode == 0 and version.stdout.startswith("carddeck "), "`carddeck --version`")
    helps = tour.run("carddeck compress --help")
    tour.check(helps.returncode == 0 and "--method" in helps.stdout, "`compress --help` reads without torch")
    extra = tour.run("carddeck compress --arch resnet20 --out card")
    tour.check(extra.returncode == 2 and "carddeck[train]" in extra.stderr, "`compress` without torch names [train]")
    deck_add = tour.run(
        f"CARDDECK_ADMIN_TOKEN={TOKEN} carddeck deck add --server {address} models/extra/resnet20-clean-lrr.onnx"
    )
    tour.check(
        deck_add.returncode != 0 and "FAILED_PRECONDITION" in deck_add.stderr and "deck init" in deck_add.stderr,
        "an admin call on the read-only default deck says FAILED_PRECONDITION and `carddeck deck init`",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, help="virtualenv directory (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    text = README.read_text()
    install, serve = setup_command(text)
    commands = tour_commands(text)
    scratch = Path(tempfile.mkdtemp(prefix="carddeck-tour-"))
    work = scratch / "work"
    work.mkdir()
    (work / "models").symlink_to(ROOT / "models")  # the tour's files, as in a clone; nothing else of the repo
    tour = Tour(venv=(args.venv or scratch / "venv").resolve(), work=work)
    busy = [p for p in DEFAULT_PORTS if not port_free(p)]
    if busy:
        tour.ports = {p: free_port() for p in (8000, 8001, 8002, 8010, 8011, 8012)}
        print(f"ports {busy} are in use here: the tour runs on {tour.ports}", flush=True)
    total = time.perf_counter()
    try:
        print(f"== fresh virtualenv {tour.venv}", flush=True)
        tour.run(f"{shlex.quote(sys.executable)} -m venv {shlex.quote(str(tour.venv))}", cwd=ROOT)
        result = tour.run(install, cwd=ROOT, timeout=1800)
        tour.check(result.returncode == 0, f"`{install}` succeeds")
        if result.returncode != 0:
            return 1
        no_torch = "python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec(\"torch\") is None)'"
        tour.check(tour.run(no_torch).returncode == 1, "no torch in the plain install (the tour needs none)")
        print("== the README's first command serves the default deck", flush=True)
        tour.start_server(tour.localize(serve), env={"CARDDECK_ADMIN_TOKEN": TOKEN})
        address = f"127.0.0.1:{tour.ports.get(8001, 8001)}"
        first_minutes(tour, address)
        print("== the README's Python clients, against it", flush=True)
        for code in serving_python_blocks(text):  # this checkout's code with the dev interpreter (tritonclient)
            python = f"PYTHONPATH={shlex.quote(str(ROOT))} {shlex.quote(sys.executable)}"
            result = tour.run(f"{python} -c {shlex.quote(tour.localize(code))}")
            tour.check(result.returncode == 0, f"the README block `{code.splitlines()[0]} ...` runs")
            mismatch = printed_mismatch(code, result.stdout)
            tour.check(not mismatch, mismatch or "it prints what the README says")
        print("== the tour", flush=True)
        for readme_command in commands:
            command = tour.localize(readme_command)
            if command.endswith("&"):
                tour.start_server(command)
            else:
                expect_tour_output(tour, command, tour.run(command), readme_command)
        tour.stop_server()
    finally:
        tour.stop_server()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.perf_counter() - total
    print(f"== tour {'PASSED' if not tour.failures else 'FAILED'} in {elapsed:.0f} s", flush=True)
    for what in tour.failures:
        print(f"   failed: {what}", flush=True)
    return 1 if tour.failures else 0


if __name__ == "__main__":
    sys.exit(main())
