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
import json
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


def misplaced_warnings(stdout: str) -> list[str]:
    """The `  warning: FILE: ...` lines of `carddeck predict` that do not sit under FILE's own line."""
    bad, above = [], ""
    for line in stdout.splitlines():
        if line.startswith("  warning: "):
            if not above or not line.startswith(f"  warning: {above.split(': ', 1)[0]}: "):
                bad.append(line)
        else:
            above = line
    return bad


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


# -- every code block of the README ------------------------------------------------------------------
TOUR, TESTS, NOT_RUN = "runs: tests/tour/run_tour.py", "runs: tests/test_tour.py", "not run: "
# Each README block, by its first line (comment removed), and what runs it. tests/test_tour.py fails on a block
# missing here, so no block goes unrun without a reason; the tour prints the ones not run.
BLOCKS = {
    "pip install -c constraints.txt . && carddeck serve": f"{TOUR} (fresh virtualenv, then its server)",
    'pip install -c constraints.txt -e ".[train,dev]" && python -m pytest': "runs: .ci/run, verbatim",
    "carddeck predict --server 127.0.0.1:8001 models/samples/*.png": f"{TOUR}; {TESTS}",
    "carddeck predict --server 127.0.0.1:8001 --policy nearest-domain models/samples/*.png": f"{TOUR}; {TESTS}",
    "carddeck deck init mydeck": f"{TOUR}; {TESTS}",
    "from carddeck.data.corruptions import corrupt, BENCHMARK_CORRUPTIONS": TESTS,
    "carddeck corrupt --data digits32 --split test --out digits32-c": f"{TESTS} (first line only; the second "
    "needs the CIFAR-10 download, which CARD-Deck never makes)",
    "from carddeck.data.corrupted import load_corrupted": TESTS,
    "carddeck compress --arch resnet20 --data digits32 --domain augmix --method lrr --sparsity 0.9 --rounds 3 "
    "--out cards/lrr-augmix": f"{NOT_RUN}trains seven CARDs, minutes each (tests marked slow train real CARDs)",
    "carddeck export runs/lrr90/card.pt --out cards/lrr90/model.onnx [--data NAME] "
    "[--format auto|dense|sparse|binary]": f"{NOT_RUN}a usage synopsis ([optional] flags), not a command",
    "DIR/manifest.json                       deck version, cards (name, version, domain, sha256 of each file), "
    "gate settings": f"{NOT_RUN}a file layout, not code",
    "from carddeck.deck import Deck, DeckStore": TESTS,
    'DeckStore.create("s3://my-bucket/decks/prod")': f"{NOT_RUN}needs an S3 bucket and endpoint "
    "(tests/deck/test_s3.py creates, changes and serves decks on moto's S3 server)",
    "carddeck calibrate --deck mydeck --policy guarded": f"{NOT_RUN}fits the router on 75 corrupted validation "
    "sets, minutes on 2 cores (tests/test_cli.py runs `carddeck calibrate` on a small deck)",
    "carddeck shift --deck mydeck --data digits32 --fit": f"{NOT_RUN}minutes on 2 cores "
    "(tests/observability/test_shift.py fits the detector)",
    "carddeck eval --deck mydeck --out reports/mydeck": f"{NOT_RUN}every policy on every corruption, minutes; the "
    "second line needs CIFAR-10 (tests/eval/test_cli.py runs `carddeck eval --limit`)",
    "carddeck serve --deck models/ --host 0.0.0.0": f"{NOT_RUN}would listen on every interface of the CI "
    "machine; `carddeck serve` and `carddeck --version` run in the tour",
    "carddeck predict --server 127.0.0.1:8001 cat.png dog.jpg batch.npy": f"{TOUR} (against the tour's own deck)",
    "from carddeck.client import CardDeckClient": f"{TOUR}; {TESTS}",
    "import numpy as np, tritonclient.grpc as tc": f"{TOUR}; {TESTS}",
    "import numpy as np, tritonclient.http as th": f"{TOUR}; {TESTS}",
    'curl -s 127.0.0.1:8000/v2/models/carddeck/infer -d \'{"inputs": [{"name": "images", "datatype": '
    '"FP32",': f"{TOUR} (against the tour's own deck)",
    "[serve]": TESTS,
    "carddeck ray-serve --deck s3://bucket/decks/prod": f"{NOT_RUN}needs Ray Serve and a store (.ci/run's "
    "`-m ray` tests run the same application on a local Ray cluster)",
    "docker compose -f serve/docker-compose.yml up --build": f"{NOT_RUN}Docker is not available on CI",
    "python -m pytest": f"{NOT_RUN}the developer's commands (.ci/run runs the test command and the tour)",
}

# What the runner puts in place of a README placeholder, in code only (expected output is never touched) ...
PLACEHOLDERS = {
    "CARDDECK_ADMIN_TOKEN=...": f"CARDDECK_ADMIN_TOKEN={TOKEN}",  # the token the tour's server has
    "mydeck [--empty]": "mydeck --empty",  # an optional flag, given
    '"data": [...]': f'"data": {[0.5] * 3 * 32 * 32}',  # one grey image, [1, 3, 32, 32]
    "my-card": "resnet20-clean-lrr",  # the load route takes the card's own name
}
# Library blocks use `images` as the reader's own: the runner defines it first.
PRELUDE = {"images": "from carddeck.data.datasets import load_dataset\nimages = load_dataset('digits32').images\n"}
EXTRA_CARD = Path("models/extra/resnet20-clean-lrr.onnx")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """Every fenced block of the README: (language, code)."""
    return [(m.group(1), m.group(2).strip()) for m in re.finditer(r"```(\w*)\n(.*?)```", text, flags=re.S)]


def first_line(code: str) -> str:
    return re.sub(r"\s+#.*$", "", code.splitlines()[0])


def readme_block(text: str, first: str) -> str:
    """The README block starting with ``first``, which BLOCKS must list as run (by whoever asks for it)."""
    if first not in BLOCKS or BLOCKS[first].startswith(NOT_RUN):
        raise SystemExit(f"BLOCKS does not list {first!r} as run")
    (code,) = [code for _, code in code_blocks(text) if first_line(code) == first]
    return code


def substitute(code: str) -> str:
    for placeholder, value in PLACEHOLDERS.items():
        code = code.replace(placeholder, value)
    return code


def make_placeholder_files(where: Path, root: Path = ROOT) -> None:
    """The files the README's blocks name as the reader's own: `cat.png` (a clean sample), `dog.jpg` (a fog
    sample, as JPEG), `batch.npy` (the samples, uint8 NHWC), `images.npy` (the same, float32 NCHW in [0, 1]);
    `card.onnx`, `my-card.onnx` (as PLACEHOLDERS renames it) and `r20-augmix/model.onnx`: the extra card."""
    import numpy as np
    from PIL import Image

    where.mkdir(parents=True, exist_ok=True)
    samples = sorted((root / "models" / "samples").glob("*.png"))
    batch = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in samples])
    shutil.copy(root / "models/samples/clean-0-label2.png", where / "cat.png")
    Image.open(root / "models/samples/fog-s5-1-label8.png").convert("RGB").save(where / "dog.jpg", quality=95)
    np.save(where / "batch.npy", batch)
    np.save(where / "images.npy", batch.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    for name in ("card.onnx", "resnet20-clean-lrr.onnx", "r20-augmix/model.onnx"):
        (where / name).parent.mkdir(exist_ok=True)
        shutil.copy(root / EXTRA_CARD, where / name)


def json_documents(text: str) -> list:
    """The JSON documents printed one after another (curl prints no newline between answers)."""
    decoder, docs, at = json.JSONDecoder(), [], 0
    while (at := re.compile(r"\s*").match(text, at).end()) < len(text):  # type: ignore[union-attr]
        doc, at = decoder.raw_decode(text, at)
        docs.append(doc)
    return docs


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
        return re.sub(r"--server localhost\b(?!:)", f"--server localhost:{self.ports[8001]}", command)

    def check(self, ok: bool, what: str) -> None:
        print(f"    {'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            self.failures.append(what)

    def run(self, command: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        start = time.perf_counter()
        print(f"$ {command if len(command) < 1000 else command[:400] + ' ... ' + command[-400:]}", flush=True)
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
        bad = misplaced_warnings(result.stdout)
        tour.check(not bad, f"each warning sits under its image's line {bad}")
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


def clients(tour: Tour, text: str) -> None:
    """The Clients synopsis and the curl block, with PLACEHOLDERS and PLACEHOLDER_FILES, against the tour's own
    deck (a copy of the default deck, with the extra card; its server has the admin token)."""
    where = tour.work / "clients"
    make_placeholder_files(where)
    images = len(list((tour.work / "models" / "samples").glob("*.png")))
    for line in readme_block(text, "carddeck predict --server 127.0.0.1:8001 cat.png dog.jpg batch.npy").splitlines():
        result = tour.run(tour.localize(substitute(line)), cwd=where)
        tour.check(result.returncode == 0, f"exit status 0 (got {result.returncode})")
        out = result.stdout
        if "cat.png" in line:
            lines = [line for line in out.splitlines() if not line.startswith("  warning: ")]
            tour.check(len(lines) == 2 + images, "one line per image (verdict warnings indented under it)")
        elif "--json" in line:
            tour.check(len(json.loads(out)) == images, "JSON, one result per image")
        elif "deck list" in line:
            tour.check("resnet20-clean-lrr/1" in out, "`deck list` lists the tour's deck")
        elif "deck init" in line:
            tour.check((where / "mydeck" / "manifest.json").is_file(), "`deck init` makes a deck")
        elif "--version next" in line:
            tour.check(bool(re.search(r"^added resnet20-clean-lrr/\d+", out, flags=re.M)), "a new version is added")
        elif "deck remove" in line:
            removed = "removed resnet20-gaussian-lrr" in out and "note: the default policy changed" in out
            tour.check(removed, "`deck remove` removes the card and shows the server's default-policy note")
    curl = readme_block(text, first_line(next(c for _, c in code_blocks(text) if c.startswith("curl -s "))))
    result = tour.run(f"export CARDDECK_ADMIN_TOKEN={TOKEN}\n{tour.localize(substitute(curl))}", cwd=where)
    answers = json_documents(result.stdout)
    tour.check(result.returncode == 0 and "error" not in result.stdout, "the curl block's requests succeed")
    labels = [o for a in answers for o in a.get("outputs", []) if o["name"] == "labels"]
    tour.check(len(labels) == 1 and labels[0]["shape"] == [1], "the infer answers one label for the one image")


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
        print("== the README's Clients synopsis and curl block, against the tour's deck", flush=True)
        clients(tour, text)
        tour.stop_server()
    finally:
        tour.stop_server()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.perf_counter() - total
    print(f"== tour {'PASSED' if not tour.failures else 'FAILED'} in {elapsed:.0f} s", flush=True)
    for first, why in BLOCKS.items():
        if why.startswith(NOT_RUN):
            print(f"   README block not run: {first[:60]!r}: {why[len(NOT_RUN) :]}", flush=True)
    for what in tour.failures:
        print(f"   failed: {what}", flush=True)
    return 1 if tour.failures else 0


if __name__ == "__main__":
    sys.exit(main())
