import json

import pytest

from carddeck.card import Accuracy, CardMeta, Compression, InputSpec, Provenance
from carddeck.errors import InvalidInput


def make_meta(**changes):
    meta = CardMeta(
        name="lrr-augmix",
        version=1,
        architecture="resnet20",
        num_classes=3,
        class_names=("a", "b", "c"),
        input=InputSpec(height=32, width=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        compression=Compression(method="lrr", sparsity=0.9, weight_bits=32),
        domain="augmix",
        signature=(0.1, -0.2, 0.3),
        accuracy=Accuracy(clean=0.97, corrupted=0.8, split="digits32:val"),
        provenance=Provenance(dataset="digits32", seed=3, package_version="0.1.0"),
    )
    return meta.replace(**changes)


def test_json_round_trip_is_exact():
    meta = make_meta()
    again = CardMeta.from_json(meta.to_json())
    assert again == meta
    assert again.to_json() == meta.to_json()


def test_optional_fields_may_be_null_or_absent():
    data = make_meta().to_dict()
    data["signature"] = None
    del data["provenance"]
    meta = CardMeta.from_dict(data)
    assert meta.signature is None
    assert meta.provenance == Provenance()


def test_unknown_field_is_named():
    data = make_meta().to_dict()
    data["compression"]["sparsityy"] = 0.5
    with pytest.raises(InvalidInput, match=r"CardMeta\.compression: unknown field 'sparsityy'"):
        CardMeta.from_dict(data)


def test_missing_field_is_named():
    data = make_meta().to_dict()
    del data["input"]["height"]
    with pytest.raises(InvalidInput, match=r"CardMeta\.input: missing required field 'height'"):
        CardMeta.from_dict(data)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("version",), "1", "expected an integer"),
        (("num_classes",), True, "expected an integer"),
        (("compression", "sparsity"), 1.0, "must be in \\[0, 1\\)"),
        (("compression", "method"), "magic", "is not one of"),
        (("name",), "../etc", "must match"),
        (("class_names",), ["a", "b"], "2 names for num_classes=3"),
        (("accuracy", "clean"), 97.0, "must be in \\[0, 1\\]"),
        (("input", "value_range"), [0, 1, 2], "expected 2 values"),
        (("signature",), [1.0, float("nan")], "finite"),
    ],
)
def test_bad_values_are_rejected_with_the_field(path, value, message):
    data = make_meta().to_dict()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(InvalidInput, match=message):
        CardMeta.from_dict(data)


def test_not_json_and_not_an_object():
    with pytest.raises(InvalidInput, match="card.json: not valid JSON"):
        CardMeta.from_json("{", source="card.json")
    with pytest.raises(InvalidInput, match="expected a JSON object"):
        CardMeta.from_json(json.dumps([1, 2]))


CONTROL = [chr(c) for c in (*range(0x20), 0x7F)]


@pytest.mark.parametrize("char", CONTROL, ids=[f"0x{ord(c):02x}" for c in CONTROL])
def test_card_names_with_any_control_character_are_refused(char):
    """A full match: ``$`` also matches before a final newline, so "name\\n" passed a ``^...$`` pattern."""
    from carddeck.serving.models import check_card_name

    for name in (f"relcard-119{char}", f"{char}relcard", f"rel{char}card"):
        with pytest.raises(InvalidInput, match="name"):
            make_meta(name=name)
        with pytest.raises(InvalidInput, match="is not a card name"):
            check_card_name(name)
    assert check_card_name("relcard-119") == "relcard-119"
