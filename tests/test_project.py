"""The project's own wiring: README commands, CI script, lint and types."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks]


def test_readme_starts_with_the_two_setup_commands():
    serve, test = readme_commands()[:2]
    assert serve.endswith("carddeck serve") and "-c constraints.txt" in serve
    assert "pytest" in test and "-c constraints.txt" in test


def test_ci_runs_the_readme_test_command_verbatim():
    test = readme_commands()[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert test in ci_lines


def test_ci_runs_the_tour_from_a_fresh_virtualenv_after_the_tests():
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    test = ci_lines.index(readme_commands()[1])
    tour = next(i for i, line in enumerate(ci_lines) if line.endswith("python tests/tour/run_tour.py"))
    assert tour > test


def test_grpc_packages_that_need_protobuf_are_bounded_below_protobuf_7():
    """From 1.82 on grpcio-health-checking/-reflection/-tools need protobuf 7, which the project caps below 7:
    without an upper bound the resolver backtracks through every release from the newest down."""
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    reqs = [Requirement(r) for r in lines]
    protobuf = next(r for r in reqs if r.name == "protobuf")
    assert "7.0" not in protobuf.specifier
    bounded = {
        r.name: r.specifier for r in reqs if r.name in ("grpcio-health-checking", "grpcio-reflection", "grpcio-tools")
    }
    assert set(bounded) == {"grpcio-health-checking", "grpcio-reflection", "grpcio-tools"}
    for name, spec in bounded.items():
        assert "1.81.1" in spec and "1.82.1" not in spec and "1.85.1" not in spec, (name, spec)


def test_constraints_pin_cpu_torch():
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().split()


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean_on_the_serving_path():
    paths = [
        p
        for p in (
            "carddeck/card.py",
            "carddeck/gating",
            "carddeck/deck",
            "carddeck/server",
            "carddeck/serving",
            "carddeck/http",
            "carddeck/observability",
            "carddeck/client",
            "carddeck/wire",
            "carddeck/app",
            "carddeck/integrations",  # Ray's data plane against the transports' Protocol, Ray installed or not
            "carddeck/commands/serve.py",
        )
        if (ROOT / p).exists()
    ]
    result = subprocess.run([sys.executable, "-m", "mypy", *paths], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cli_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "carddeck", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    for name in ("serve", "corrupt", "compress", "export", "eval"):
        assert name in result.stdout


def imports_only(packages: tuple[str, ...], forbidden: tuple[str, ...]) -> subprocess.CompletedProcess:
    """Import every module of ``packages`` (and resolve the public API) in a fresh interpreter; fails when
    one of the ``forbidden`` top-level modules got loaded."""
    code = (
        "import sys, importlib, pkgutil, carddeck\n"
        f"for pkg in {packages!r}:\n"
        "    mod = importlib.import_module(pkg)\n"
        "    for info in pkgutil.walk_packages(mod.__path__, pkg + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "for name in carddeck.__all__:\n"
        "    getattr(carddeck, name)  # the public API resolves\n"
        f"loaded = [m for m in {forbidden!r} if m in sys.modules]\n"
        "assert not loaded, f'{loaded} imported'\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)


def test_serving_path_does_not_import_torch():
    pkgs = ("gating", "deck", "server", "serving", "http", "observability", "client", "wire", "app")
    result = imports_only(tuple(f"carddeck.{p}" for p in pkgs), ("torch", "ray"))  # ray: only integrations may
    assert result.returncode == 0, result.stderr


def test_the_serving_core_imports_no_transport():
    result = imports_only(("carddeck.serving",), ("grpc", "starlette", "uvicorn", "torch"))
    assert result.returncode == 0, result.stderr


# -- boundaries between packages (DESIGN.md): read from the source with ast, function-local imports included
COMMAND_LAYER = ("commands", "__main__")  # every `carddeck` subcommand and `python -m carddeck`
TRANSPORTS = ("server", "http")
TRANSPORT_MODULES = ("grpc", "grpc_health", "grpc_reflection", "starlette", "uvicorn", "prometheus_client")
# where each package may not reach: (importer, imported prefixes, why)
FORBIDDEN = (
    ("serving", ("carddeck.server", "carddeck.http", "carddeck.app", *TRANSPORT_MODULES), "serving is transport-free"),
    ("client", ("carddeck.server", "carddeck.http", "carddeck.serving", "carddeck.app"), "client: over the stubs"),
    ("server", ("carddeck.http",), "transports do not import each other"),
    ("http", ("carddeck.server", "carddeck.wire"), "transports do not import each other"),
)
# grpc is a transport's: the gRPC server (and the process that starts it), Ray's ingress, the client and the
# stubs it shares with the server. Everyone else (commands included) sees typed carddeck.errors.
GRPC = ("grpc", "grpc_health", "grpc_reflection")
GRPC_IMPORTERS = ("server", "app", "integrations", "client", "wire")


def module_imports(root: Path, package: str = "carddeck") -> dict[str, set[str]]:
    """Each module of ``package`` under ``root`` -> the absolute module names it imports (anywhere in it)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        name = ".".join(parts)
        here = parts if rel.name == "__init__" else parts[:-1]  # the package relative imports start from
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1]) if node.level else ""
                module = ".".join(p for p in (base, node.module or "") if p)
                found.add(module)
                # `from carddeck import cli` imports the module carddeck.cli
                found.update(f"{module}.{alias.name}" for alias in node.names)
        graph[name] = found
    return graph


def subpackage(module: str) -> str | None:
    """carddeck.deck.store -> deck; carddeck.card -> card; the package itself and other modules -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "carddeck" and len(parts) > 1 else None


def package_graph(root: Path) -> dict[str, set[str]]:
    """Subpackage (or top-level module) of carddeck -> those it imports, for the names that exist."""
    graph = module_imports(root)
    top = {subpackage(m) for m in graph} - {None}
    edges: dict[str, set[str]] = {}
    for module, imported in graph.items():
        src = subpackage(module)
        if src is None:
            continue
        dst = {subpackage(m) for m in imported} & top
        edges.setdefault(src, set()).update(d for d in dst if d and d != src)
    return edges


def package_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def boundary_violations(root: Path) -> list[str]:
    found = []
    for module, imported in sorted(module_imports(root).items()):
        src = subpackage(module)
        for name in sorted(imported):
            dst = subpackage(name)
            if src not in COMMAND_LAYER and dst in COMMAND_LAYER:
                found.append(f"{module} imports {name}: library packages import no command")
            for importer, prefixes, why in FORBIDDEN:
                if src == importer and any(name == p or name.startswith(p + ".") for p in prefixes):
                    found.append(f"{module} imports {name}: {why}")
            if src not in GRPC_IMPORTERS and name.split(".")[0] in GRPC:
                found.append(f"{module} imports {name}: only {', '.join(GRPC_IMPORTERS)} import grpc")
    found += [f"package cycle: {' <-> '.join(c)}" for c in package_cycles(package_graph(root))]
    return found


def test_no_import_crosses_a_boundary():
    assert boundary_violations(ROOT) == []


def test_the_boundary_check_sees_a_bad_import(tmp_path):
    """A copy of the package with one bad import of each kind, function-local ones included: each is named."""
    import shutil

    shutil.copytree(ROOT / "carddeck", tmp_path / "carddeck", ignore=shutil.ignore_patterns("__pycache__", "proto_gen"))
    bad = {
        "deck/zz_bad.py": "def f():\n    from carddeck.commands import cli\n",
        "serving/zz_bad.py": "import grpc\n",
        "client/zz_bad.py": "from carddeck.server import convert\n",
        "http/zz_bad.py": "from ..server import status_codes\n",
        "commands/zz_bad.py": "def f():\n    import grpc.aio\n",
        "card.py": (ROOT / "carddeck/card.py").read_text() + "\n\ndef _f():\n    import carddeck.eval.report\n",
    }
    for rel, text in bad.items():
        (tmp_path / "carddeck" / rel).write_text(text)
    found = "\n".join(boundary_violations(tmp_path))
    assert "carddeck.deck.zz_bad imports carddeck.commands.cli: library packages import no command" in found
    assert "carddeck.serving.zz_bad imports grpc: serving is transport-free" in found
    assert "carddeck.client.zz_bad imports carddeck.server.convert: client: over the stubs" in found
    assert "carddeck.http.zz_bad imports carddeck.server.status_codes: transports do not" in found
    assert "carddeck.commands.zz_bad imports grpc.aio: only server, app, integrations, client, wire import" in found
    assert "package cycle: " in found and "card" in found.split("package cycle: ")[1]


# -- one file is enough: a throw-away store backend from a temporary module
MEMORY_BACKEND = '''
"""A deck in this process's memory (mem://NAME): the whole backend, in this one file."""
import contextlib
import itertools
import time

from carddeck.deck.debris import AgedDebris
from carddeck.errors import ConcurrentChange

STORES = {}  # name -> {key: (bytes, stamp, written at)}
_stamps = itertools.count(1)


class MemoryBackend:
    remote = True  # card files are "downloaded": the store caches them by sha256

    def __init__(self, name):
        self.root = f"mem://{name}"
        self.files = STORES.setdefault(name, {})

    @classmethod
    def from_location(cls, location):
        return cls(location[len("mem://"):])

    def read(self, key):
        if key not in self.files:
            raise FileNotFoundError(key)
        return self.files[key][0]

    def read_stamped(self, key):
        return self.read(key), self.files[key][1]

    def write(self, key, data):
        self.files[key] = (bytes(data), str(next(_stamps)), time.time())

    def stamp(self, key):
        return self.files[key][1] if key in self.files else None

    def commit(self, key, data, expected):
        if self.stamp(key) != expected:
            raise ConcurrentChange(f"{self.root}/{key} changed since it was read")
        self.write(key, data)

    def list(self, prefix):
        return sorted(k for k in self.files if k.startswith(prefix))

    def ages(self, prefix):
        return {k: time.time() - self.files[k][2] for k in self.list(prefix)}

    def delete(self, prefix):
        for key in [k for k in self.files if k == prefix or k.startswith(prefix.rstrip("/") + "/")]:
            del self.files[key]

    def fresh(self, key):
        return f"{key}-{next(_stamps)}"

    def lock(self):
        return contextlib.nullcontext()

    def debris(self, grace_s):
        return AgedDebris(self, grace_s)


BACKEND = MemoryBackend
'''


def test_a_store_backend_is_one_module(tmp_path, monkeypatch):
    """A backend module dropped into a ``carddeck/deck/backends`` folder on the path serves a deck by its
    scheme, with no other file touched: a deck is created, changed, served and swept through it."""
    import numpy as np

    from carddeck.deck import Deck, DeckStore, backends
    from carddeck.deck.backend import schemes
    from carddeck.errors import InvalidInput
    from carddeck.serving.dataplane import Dataplane, DataplaneConfig
    from tests.deck.conftest import card

    with pytest.raises(InvalidInput, match=r"no backend for mem://; known: file://, s3://"):
        DeckStore("mem://deck")
    (tmp_path / "mem.py").write_text(MEMORY_BACKEND)
    monkeypatch.setattr(backends, "__path__", [*backends.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "carddeck.deck.backends.mem", raising=False)
    assert "mem" in schemes()

    store = DeckStore.create("mem://deck")
    store.add_card(card("g1", "gaussian", seed=1))
    store.add_card(card("a1", "augmix", seed=2))
    local = DeckStore.create(tmp_path / "local")
    local.add_card(card("g1", "gaussian", seed=1))
    local.add_card(card("a1", "augmix", seed=2))
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)

    plane = Dataplane(DataplaneConfig(deck_path="mem://deck", batching=False, poll_interval_s=0))
    try:
        assert plane.start().card_names == ("g1", "a1")
        prediction, _ = plane.predict(images)
        np.testing.assert_array_equal(prediction.probabilities, Deck.open(local.root).predict(images).probabilities)
    finally:
        plane.close()

    files = sys.modules["carddeck.deck.backends.mem"].STORES["deck"]
    gone = store.manifest().find("g1").path
    store.remove_card("g1")
    assert not [k for k in files if k.startswith(gone)]  # the backend's debris rule deleted its files
    assert DeckStore("mem://deck").list_cards()[0].name == "a1"


# -- one file is enough: a throw-away compression method from a temporary module
ZAP_METHOD = '''
"""A throw-away compression method: the whole of it, in this one file."""
from carddeck.catalog import MethodSpec, Option
from carddeck.compress.methods import METHODS, Method

SPEC = MethodSpec(
    name="zap",
    summary="a throw-away method",
    export_format="sparse",
    options=(Option("zap_level", "int", 3, "how hard to zap"),),
)


@METHODS.register("zap")
class Zap(Method):
    name = "zap"
'''


def test_a_compression_method_is_one_module(tmp_path):
    """A method module in a ``carddeck/compress`` folder on the path shows in ``carddeck compress --help`` with
    its option, validates as CardMeta's compression method, has its export format, and trains with its
    option through the registry, with no other file touched."""
    folder = tmp_path / "carddeck" / "compress"
    folder.mkdir(parents=True)
    (folder / "zap.py").write_text(ZAP_METHOD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    script = """if True:
        import sys
        from carddeck.card import Compression
        from carddeck.compress import METHODS, CompressConfig, plan
        from carddeck.export.formats import format_for
        from tests.cards import tiny_meta

        meta = tiny_meta().replace(compression=Compression(method="zap", sparsity=0.5))
        assert meta.compression.method == "zap" and format_for("zap") == "sparse"
        p = plan(CompressConfig(arch="resnet20", out=sys.argv[1], method="zap", options={"zap_level": 5},
                                width=0.0625, epochs=1, corruptions=()))
        assert type(p.method) is METHODS.get("zap") and p.method.config.options == {"zap_level": 5}
        print("ok")
    """
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    helps = subprocess.run([sys.executable, "-m", "carddeck", "compress", "--help"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    text = " ".join(helps.stdout.split())
    assert "--zap-level ZAP_LEVEL zap: how hard to zap (default: 3)" in text and "zap (a throw-away method)" in text
    # and without the module: unknown everywhere
    env["PYTHONPATH"] = str(ROOT)
    gone = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert gone.returncode != 0 and "'zap' is not one of ('biprop', 'dense'" in gone.stderr
