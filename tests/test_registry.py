import pytest

from carddeck.errors import InvalidInput
from carddeck.registry import Registry


def test_unknown_name_lists_valid_choices():
    reg: Registry[int] = Registry("widget")
    reg.register("b")(2)
    reg.register("a")(1)
    assert reg.get("a") == 1
    assert reg.names() == ["b", "a"]
    with pytest.raises(InvalidInput, match="unknown widget 'c'; valid choices: a, b"):
        reg.get("c")


def test_double_registration_is_a_bug():
    reg: Registry[int] = Registry("widget")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(2)
