import argparse
import json
import subprocess
import sys

import pytest

from carddeck.errors import InvalidInput
from carddeck.serving.settings import Settings, add_arguments, load_settings
from tests.servers import ROOT


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_listen_on_loopback_8001():
    s = load_settings(parse(), env={})
    assert (s.host, s.port, s.metrics_port) == ("127.0.0.1", 8001, 8002)
    assert s.batching and s.max_batch_size == 64


def test_adaptation_is_on_by_default_at_the_measured_minimum_batch():
    """Kills the opt-in default (0): measured on both development decks it costs nothing clean and nothing
    held out (README "Test-time adaptation"); --adapt-min-batch 0 still turns it off."""
    from carddeck.deck.adapt import MIN_BATCH

    assert load_settings(parse(), env={}).adapt_min_batch == MIN_BATCH > 0
    assert load_settings(parse("--adapt-min-batch", "0"), env={}).adapt_min_batch == 0


def test_metrics_listen_on_the_grpc_host_unless_told_otherwise():
    from carddeck.app.process import _observability

    assert load_settings(parse(), env={}).metrics_address == "127.0.0.1"
    assert load_settings(parse("--host", "::1"), env={}).metrics_address == "::1"
    assert (
        load_settings(parse("--host", "0.0.0.0", "--metrics-host", "127.0.0.1"), env={}).metrics_address == "127.0.0.1"
    )
    _, _, endpoint = _observability(load_settings(parse("--metrics-port", "0"), env={}))
    try:  # the socket really is bound to loopback, like the gRPC default
        assert endpoint.server.server_address[0] == "127.0.0.1"
    finally:
        endpoint.stop()


def test_flags_beat_env_beat_file_beat_defaults(tmp_path):
    config = tmp_path / "carddeck.toml"
    config.write_text("[serve]\nport = 9001\nmax-batch-size = 16\nmax_wait_ms = 5.0\nworkers = 3\n")
    env = {"CARDDECK_CONFIG": str(config), "CARDDECK_PORT": "9002", "CARDDECK_MAX_BATCH_SIZE": "32"}
    s = load_settings(parse("--port", "9003"), env=env)
    assert s.port == 9003  # flag
    assert s.max_batch_size == 32  # env over file
    assert s.max_wait_ms == 5.0 and s.workers == 3  # file over defaults
    assert s.drain_timeout_s == Settings().drain_timeout_s  # default


def test_json_config_and_boolean_flags(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"batching": False, "host": "0.0.0.0"}))
    assert load_settings(parse("--config", str(config)), env={}).batching is False
    assert load_settings(parse("--config", str(config), "--batching"), env={}).batching is True
    assert load_settings(parse(), env={"CARDDECK_BATCHING": "off"}).batching is False


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"CARDDECK_PORT": "http"}, "CARDDECK_PORT"),
        ({"CARDDECK_PORT": "70000"}, "'port'"),
        ({"CARDDECK_BATCHING": "maybe"}, "true or false"),
        ({"CARDDECK_TLS_CERT": "/x.pem"}, "tls_key"),
        ({"CARDDECK_DECK_MODEL_NAME": "team/deck"}, "deck_model_name.*path segment"),
        ({"CARDDECK_DECK_MODEL_NAME": ""}, "deck_model_name"),
    ],
)
def test_bad_values_name_the_setting(env, needle):
    with pytest.raises(InvalidInput, match=needle):
        load_settings(parse(), env=env)


def test_unknown_config_key_is_rejected(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("prot = 1\n")
    with pytest.raises(InvalidInput, match="unknown setting 'prot'"):
        load_settings(parse("--config", str(config)), env={})


def test_tokens_come_from_env_or_file_never_flags(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    s = load_settings(parse("--admin-token-file", str(token_file)), env={"CARDDECK_INFERENCE_TOKEN": "inf"})
    assert s.resolved_admin_token() == "s3cret" and s.resolved_inference_token() == "inf"
    assert s.public_dict()["inference_token"] == "***"
    with pytest.raises(SystemExit):
        parse("--admin-token", "x")


def test_serve_help_documents_every_option():
    out = subprocess.run(
        [sys.executable, "-m", "carddeck", "serve", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for f in Settings.__dataclass_fields__.values():
        env = "CARDDECK_" + f.name.upper()
        assert env in text, env
        if f.metadata["flag"]:
            assert "--" + f.name.replace("_", "-") in text
