"""serving/ is transport-free: importing all of it loads neither grpc nor an HTTP stack."""

import subprocess
import sys

from tests.servers import ROOT


def test_the_serving_core_imports_no_transport():
    code = (
        "import importlib, pkgutil, sys\n"
        "import carddeck.serving as pkg\n"
        "for info in pkgutil.walk_packages(pkg.__path__, 'carddeck.serving.'):\n"
        "    importlib.import_module(info.name)\n"
        "loaded = sorted(m for m in ('grpc', 'starlette', 'uvicorn', 'torch') if m in sys.modules)\n"
        "assert not loaded, f'carddeck.serving imported {loaded}'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
