"""Ships the default deck in models/ inside the wheel as the package ``carddeck._default_deck``.

Everything else is configured in pyproject.toml; only this mapping of a top-level folder into the
package needs setup.py.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["carddeck", "carddeck.*"]), "carddeck._default_deck"],
    package_dir={"carddeck._default_deck": "models"},
    package_data={
        "carddeck._default_deck": [
            *("manifest.json", "READ-ONLY", "*.npz", "*.md"),
            *("cards/*/*/*", "gate/*", "report/*", "samples/*"),
        ]
    },
)
