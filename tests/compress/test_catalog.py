"""The method declarations read without torch (carddeck.catalog) are the ones the registry runs."""

import importlib

from carddeck.catalog import method_options, method_specs
from carddeck.compress import METHODS
from carddeck.compress.pipeline import CompressConfig
from carddeck.export.formats import FORMATS


def test_every_declared_method_is_registered_and_every_registered_one_declared():
    assert set(method_specs()) == set(METHODS.names())


def test_the_declarations_read_from_source_are_the_modules_own():
    for name, spec in method_specs().items():
        module = importlib.import_module(f"carddeck.compress.{spec.module}")
        declared = [v for v in vars(module).values() if type(v).__name__ == "MethodSpec" and v.name == name]
        assert len(declared) == 1, name
        assert declared[0] == spec.__class__(**{**spec.__dict__, "module": ""}), name
        assert spec.export_format in FORMATS


def test_options_with_a_config_field_keep_its_default():
    fields = CompressConfig.__dataclass_fields__
    for name, (option, _users) in method_options().items():
        if name in fields:
            assert fields[name].default == option.default, name
