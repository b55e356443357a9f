"""Ships the default deck in models/ inside the wheel as the package ``carddeck.default_deck``.

Everything else is configured in pyproject.toml; only this mapping of a top-level folder into the
package needs setup.py.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["carddeck", "carddeck.*"]), "carddeck.default_deck"],
    package_dir={"carddeck.default_deck": "models"},
    package_data={"carddeck.default_deck": ["manifest.json", "*.npz", "cards/*/*/*", "samples/*"]},
)
