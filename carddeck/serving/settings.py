"""One settings object for ``carddeck serve``: flags > env ``CARDDECK_*`` > config file > defaults.

Every option is a field of :class:`Settings`; its flag (``--max-batch-size``), environment
variable (``CARDDECK_MAX_BATCH_SIZE``) and config-file key (``max_batch_size``) all derive from the
field name, so ``carddeck serve --help`` documents them all from one place. Secrets (tokens) have no
flag: a command line is visible to every user of the machine through ``ps``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carddeck.deck.adapt import MIN_BATCH
from carddeck.deck.default import default_deck_path
from carddeck.deck.store import DEBRIS_GRACE_S
from carddeck.errors import InvalidInput

ENV_PREFIX = "CARDDECK_"
CONFIG_ENV = "CARDDECK_CONFIG"


def _opt(default: Any, help: str, *, flag: bool = True, secret: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "flag": flag, "secret": secret})


@dataclass(frozen=True)
class Settings:
    deck: str = _opt(
        "",
        "deck store: a directory, file://DIR or s3://BUCKET/PREFIX (default: the packaged default deck, read-only; "
        "`carddeck deck init DIR` copies it)",
    )
    host: str = _opt("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = _opt(8001, "gRPC port (0: pick a free one and log it)")
    http_port: int = _opt(8000, "Open Inference Protocol over HTTP/REST port (0: pick a free one; -1: no HTTP)")
    workers: int = _opt(32, "gRPC worker threads (concurrent RPCs)")
    batching: bool = _opt(True, "merge concurrent small requests into micro-batches")
    max_batch_size: int = _opt(64, "most images in one micro-batch; larger requests run on their own")
    max_wait_ms: float = _opt(2.0, "longest a request waits for others to join its micro-batch while more are arriving")
    preferred_batch_sizes: str = _opt(
        "",
        "comma-separated micro-batch sizes that run at once without waiting (e.g. 16,32); a deck's manifest "
        "sets them per model (batching.preferred_batch_size)",
    )
    batch_workers: int = _opt(
        1,
        "micro-batches in flight at once (while one runs, the next fills; more split the queue into smaller "
        "ones; 0: one per CPU core)",
    )
    max_request_images: int = _opt(4096, "most images in one request (more: RESOURCE_EXHAUSTED)")
    max_message_mb: int = _opt(64, "largest gRPC message or HTTP body received (MiB)")
    max_json_mb: int = _opt(4, "largest all-JSON HTTP body (MiB): larger tensors go binary (binary_tensor_data)")
    max_inflight_images: int = _opt(16384, "most images being served at once (more: RESOURCE_EXHAUSTED / 429)")
    http_request_timeout_s: float = _opt(30.0, "longest an HTTP client may take to send a request, headers and body")
    http_max_connections: int = _opt(1000, "most open HTTP connections (kept below half the open-file limit)")
    max_card_mb: int = _opt(1024, "largest card accepted by AddCard / RepositoryModelLoad (MiB)")
    admin_token: str = _opt(
        "", "bearer token for AddCard/RemoveCard/RepositoryModelLoad/Unload", flag=False, secret=True
    )
    admin_token_file: str = _opt("", "file holding the admin bearer token")
    allow_unauthenticated_admin: bool = _opt(
        False, "serve the admin RPCs without a token (logs a warning; for local experiments only)"
    )
    inference_token: str = _opt("", "bearer token required for inference RPCs (optional)", flag=False, secret=True)
    inference_token_file: str = _opt("", "file holding the inference bearer token")
    tls_cert: str = _opt("", "PEM server certificate chain (with --tls-key: serve TLS)")
    tls_key: str = _opt("", "PEM private key of --tls-cert")
    tls_client_ca: str = _opt("", "PEM CA bundle: require client certificates signed by it (mutual TLS)")
    drain_timeout_s: float = _opt(30.0, "on SIGTERM, longest wait for in-flight requests before exiting")
    shutdown_delay_s: float = _opt(0.0, "on SIGTERM, keep serving this long after readiness goes false")
    poll_interval_s: float = _opt(
        2.0, "how often to check the store for a manifest written by another replica (0: never)"
    )
    store_timeout_s: float = _opt(10.0, "a store call or poll not answered in this time counts as the store down")
    debris_grace_s: float = _opt(
        DEBRIS_GRACE_S,
        "keep the files of removed cards and superseded routers this long for replicas still loading an older "
        "manifest, then delete them (what interrupted writes leave goes at once)",
    )
    calibration_data: str = _opt(
        "", "dataset spec (e.g. digits32) whose clean images sign cards added without a signature"
    )
    providers: str = _opt("", "comma-separated ONNX Runtime execution providers (default: best available)")
    intra_op_threads: int = _opt(
        0, "ONNX Runtime threads per card (0: one each; cards and the chunks of larger runs share the cores)"
    )
    ort_spinning: bool = _opt(
        False, "let ONNX Runtime's threads spin between runs (less latency on a dedicated idle machine, more CPU)"
    )
    deck_model_name: str = _opt("carddeck", "the gated deck's model name in the Open Inference Protocol")
    metrics_host: str = _opt("", "address of the Prometheus /metrics endpoint (empty: the gRPC --host)")
    metrics_port: int = _opt(8002, "Prometheus /metrics port (-1: no metrics endpoint)")
    shift_window: int = _opt(32, "shift signal: requests under 16 images are tested over a window of this many")
    shift_stride: int = _opt(8, "shift signal: test the window every this many new images")
    # On by default: with the calibration images drawn from every class and requests of few classes left
    # alone (serving/adaptation.py), it lifts digits32 held out 96.96 -> 97.90 and leaves leaves32 as it was
    # (clean unchanged on both; `carddeck eval --adapt`, README "Test-time adaptation").
    adapt_min_batch: int = _opt(
        MIN_BATCH,
        "test-time adaptation: requests of at least this many images (the measured minimum, "
        f"{MIN_BATCH}) that the shift signal calls uncovered, and whose answer spreads over most classes, "
        "are answered by the cards' adaptive variants, on their own images (0: never adapt)",
    )
    log_format: str = _opt("text", "log format: text, or json (one JSON object per line with request_id)")

    def __post_init__(self) -> None:
        checks = [
            ("port", 0 <= self.port <= 65535, "must be in 0..65535"),
            ("http_port", -1 <= self.http_port <= 65535, "must be in -1..65535"),
            ("workers", self.workers >= 1, "must be at least 1"),
            ("max_batch_size", self.max_batch_size >= 1, "must be at least 1"),
            ("max_wait_ms", self.max_wait_ms >= 0, "must be >= 0"),
            ("batch_workers", self.batch_workers >= 0, "must be >= 0"),
            ("preferred_batch_sizes", self._preferred_ok(), "must be comma-separated integers in 1..max_batch_size"),
            ("max_request_images", self.max_request_images >= 1, "must be at least 1"),
            (
                "deck_model_name",
                bool(self.deck_model_name) and not set(self.deck_model_name) & set("/?#% \t\n"),
                "must be a non-empty name without '/', '?', '#', '%' or spaces (it is a path segment of "
                "/v2/models/NAME)",
            ),
            ("max_message_mb", self.max_message_mb >= 1, "must be at least 1"),
            ("max_json_mb", self.max_json_mb >= 1, "must be at least 1"),
            (
                "max_inflight_images",
                self.max_inflight_images >= self.max_request_images,
                f"must be at least max_request_images ({self.max_request_images})",
            ),
            ("http_request_timeout_s", self.http_request_timeout_s > 0, "must be > 0"),
            ("http_max_connections", self.http_max_connections >= 1, "must be at least 1"),
            ("store_timeout_s", self.store_timeout_s > 0, "must be > 0"),
            ("max_card_mb", self.max_card_mb >= 1, "must be at least 1"),
            ("drain_timeout_s", self.drain_timeout_s >= 0, "must be >= 0"),
            ("shutdown_delay_s", self.shutdown_delay_s >= 0, "must be >= 0"),
            ("poll_interval_s", self.poll_interval_s >= 0, "must be >= 0"),
            ("debris_grace_s", self.debris_grace_s >= 0, "must be >= 0"),
            ("intra_op_threads", self.intra_op_threads >= 0, "must be >= 0"),
            ("metrics_port", -1 <= self.metrics_port <= 65535, "must be in -1..65535"),
            ("shift_window", self.shift_window >= 4, "must be at least 4"),
            ("shift_stride", self.shift_stride >= 1, "must be at least 1"),
            ("adapt_min_batch", self.adapt_min_batch >= 0, "must be >= 0"),
            ("log_format", self.log_format in ("text", "json"), "must be text or json"),
            ("tls_key", bool(self.tls_cert) == bool(self.tls_key), "TLS needs both tls_cert and tls_key"),
            ("tls_client_ca", not self.tls_client_ca or bool(self.tls_cert), "mutual TLS needs tls_cert and tls_key"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise InvalidInput(f"setting {name!r}: {why}, got {getattr(self, name)!r}")

    def _preferred_ok(self) -> bool:
        try:
            return all(1 <= n <= self.max_batch_size for n in self.preferred_batch_size_list())
        except ValueError:
            return False

    # -- derived ------------------------------------------------------------------------------
    def preferred_batch_size_list(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.preferred_batch_sizes.split(",") if v.strip())

    @property
    def deck_path(self) -> Path | str:
        """The deck's location: a directory, or a URL (``s3://``, ``file://``) kept as given."""
        if "://" in self.deck:
            return self.deck
        return Path(self.deck).expanduser() if self.deck else default_deck_path()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def metrics_address(self) -> str:
        """Where /metrics listens: ``metrics_host``, else the gRPC host (never wider than gRPC by default)."""
        return self.metrics_host or self.host

    def resolved_admin_token(self) -> str:
        return self.admin_token or _read_secret(self.admin_token_file, "admin_token_file")

    def resolved_inference_token(self) -> str:
        return self.inference_token or _read_secret(self.inference_token_file, "inference_token_file")

    def provider_list(self) -> list[str] | None:
        names = [p.strip() for p in self.providers.split(",") if p.strip()]
        return names or None

    def public_dict(self) -> dict[str, Any]:
        """The settings with secrets masked, for logs."""
        out = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.metadata.get("secret") and out[f.name]:
                out[f.name] = "***"
        return out


def _read_secret(path: str, name: str) -> str:
    if not path:
        return ""
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError as exc:
        raise InvalidInput(f"setting {name!r}: cannot read {path}: {exc.strerror}") from None
    if not token:
        raise InvalidInput(f"setting {name!r}: {path} is empty")
    return token


# -- sources -----------------------------------------------------------------------------------
def _fields() -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(Settings)}


def _convert(name: str, value: Any, source: str) -> Any:
    kind = type(_fields()[name].default)
    where = f"{source}: setting {name!r}"
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.strip().lower() in ("1", "true", "yes", "on")
        raise InvalidInput(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise InvalidInput(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise InvalidInput(f"{where}: expected an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise InvalidInput(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise InvalidInput(f"{where}: expected a number, got {value!r}") from None
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise InvalidInput(f"{where}: expected a string, got {value!r}")
    return str(value)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML (``.toml``) or JSON file; keys are field names (``-`` or ``_``)."""
    path = Path(path).expanduser()
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"config file {path}: {exc.strerror}") from None
    try:
        if path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            data = tomllib.loads(text.decode())
        else:
            data = json.loads(text)
    except Exception as exc:
        raise InvalidInput(
            f"config file {path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({exc})"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("serve"), dict):
        data = data["serve"]  # a shared carddeck.toml may hold a [serve] table
    if not isinstance(data, dict):
        raise InvalidInput(f"config file {path}: expected a table/object of settings")
    known = _fields()
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise InvalidInput(f"config file {path}: unknown setting {key!r}; known: {', '.join(known)}")
        out[name] = _convert(name, value, f"config file {path}")
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    for name in _fields():
        key = ENV_PREFIX + name.upper()
        if key in env:
            out[name] = _convert(name, env[key], f"env {key}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; defaults are SUPPRESSed so only flags actually given override."""
    parser.allow_abbrev = False  # "--admin-token" must not silently mean "--admin-token-file"
    parser.add_argument("--config", default=argparse.SUPPRESS, help=f"TOML or JSON settings file (env {CONFIG_ENV})")
    for f in dataclasses.fields(Settings):
        env = ENV_PREFIX + f.name.upper()
        if not f.metadata["flag"]:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} [env {env}; default {f.default!r}]"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(
                flag, type=type(f.default), default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text
            )
    secrets = [ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings) if f.metadata["secret"]]
    parser.epilog = (
        f"Every option can also be set in the environment (CARDDECK_<OPTION>) or a config file (--config). "
        f"Secrets are read only from the environment, the config file or a *_file option: {', '.join(secrets)}. "
        "Precedence: flags > environment > config file > defaults."
    )


def load_settings(
    args: argparse.Namespace | Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    env = os.environ if env is None else env
    flags = dict(vars(args) if isinstance(args, argparse.Namespace) else (args or {}))
    values: dict[str, Any] = {}
    config = flags.pop("config", None) or env.get(CONFIG_ENV)
    if config:
        values.update(read_config_file(config))
    values.update(_from_env(env))
    known = _fields()
    values.update({k: _convert(k, v, "flag") for k, v in flags.items() if k in known})
    return Settings(**values)


__all__ = [
    "CONFIG_ENV",
    "ENV_PREFIX",
    "Settings",
    "add_arguments",
    "load_settings",
    "read_config_file",
]
