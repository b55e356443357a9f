"""models/build.py's export step: what the recipe does when export refuses a card.

The refusal itself is export's (tests/export); here the recipe's reaction is checked with a
recording stand-in for the `carddeck export` subprocess, because a card whose int8 copy fails
parity only comes out of an hour of training (the leaves32 build hit it for real; its report
carries the note this test checks for).
"""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
from pathlib import Path

import pytest

from carddeck.export.card_export import export_card
from carddeck.export.formats import CALIBRATION_METHODS

BUILD = Path(__file__).resolve().parents[1] / "models" / "build.py"


@pytest.fixture
def build(monkeypatch):
    spec = importlib.util.spec_from_file_location("deck_build", BUILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _runner(monkeypatch, build, refuse: int) -> list[tuple]:
    """``carddeck export`` that refuses the first ``refuse`` attempts; returns the flags of each attempt."""
    attempts: list[tuple] = []

    def carddeck(command, checkpoint, _out_flag, onnx, *flags):
        assert command == "export"
        attempts.append(flags)
        if len(attempts) <= refuse:
            raise subprocess.CalledProcessError(2, ["carddeck", "export"])
        onnx.parent.mkdir(parents=True, exist_ok=True)
        onnx.write_bytes(b"onnx")

    monkeypatch.setattr(build, "carddeck", carddeck)
    return attempts


def test_a_refused_int8_card_tries_the_other_calibrations_then_stays_in_float(tmp_path, monkeypatch, build):
    attempts = _runner(monkeypatch, build, refuse=3)
    onnx = tmp_path / "onnx" / "lowfreq-biprop" / "model.onnx"
    build.export(tmp_path / "lowfreq-biprop" / "card.pt", onnx, "biprop")
    # export's default first, then each other calibration export offers, then float: from export's own tables
    default = inspect.signature(export_card).parameters["calibration_method"].default
    others = [("--calibration-method", m) for m in CALIBRATION_METHODS if m != default]
    assert others and attempts == [(), *others, ("--format", "dense")]
    notes = build.build_notes([onnx])
    assert "lowfreq-biprop" in notes and "`--format dense`" in notes


def test_a_card_exported_on_the_first_try_carries_no_note_even_after_an_earlier_fallback(tmp_path, monkeypatch, build):
    onnx = tmp_path / "onnx" / "augmix-biprop" / "model.onnx"
    _runner(monkeypatch, build, refuse=1)
    build.export(tmp_path / "augmix-biprop" / "card.pt", onnx, "biprop")
    assert "percentile" in build.build_notes([onnx])
    attempts = _runner(monkeypatch, build, refuse=0)
    build.export(tmp_path / "augmix-biprop" / "card.pt", onnx, "biprop")
    assert attempts == [()]
    assert build.build_notes([onnx]) == ""


def test_float_cards_are_not_retried_a_refusal_stops_the_build(tmp_path, monkeypatch, build):
    attempts = _runner(monkeypatch, build, refuse=1)
    with pytest.raises(subprocess.CalledProcessError):
        build.export(tmp_path / "augmix-lrr" / "card.pt", tmp_path / "onnx" / "augmix-lrr" / "model.onnx", "lrr")
    assert attempts == [()]


def test_when_every_fallback_is_refused_the_build_stops(tmp_path, monkeypatch, build):
    attempts = _runner(monkeypatch, build, refuse=99)
    with pytest.raises(subprocess.CalledProcessError):
        build.export(tmp_path / "x" / "card.pt", tmp_path / "onnx" / "x" / "model.onnx", "biprop")
    assert attempts[-1] == ("--format", "dense") and len(attempts) == len(set(attempts)) > 2
