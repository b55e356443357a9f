"""The project's own wiring: README commands, CI script, lint and types."""

import re
import subprocess
import sys
from pathlib import Path

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
        )
        if (ROOT / p).exists()
    ]
    result = subprocess.run([sys.executable, "-m", "mypy", *paths], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cli_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "carddeck.cli", "--help"], cwd=ROOT, capture_output=True, text=True)
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
    pkgs = ("gating", "deck", "server", "serving", "http", "observability", "client")
    result = imports_only(tuple(f"carddeck.{p}" for p in pkgs), ("torch", "ray"))  # ray: only integrations may
    assert result.returncode == 0, result.stderr


def test_the_serving_core_imports_no_transport():
    result = imports_only(("carddeck.serving",), ("grpc", "starlette", "uvicorn", "torch"))
    assert result.returncode == 0, result.stderr
