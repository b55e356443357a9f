"""Make one CARD: validate everything, train under a method, measure, write ``card.pt``.

Every check that can fail on bad input runs before the first training step, with a message that
names the valid choices.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import logging
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import carddeck
from carddeck.card import Accuracy, CardMeta, Compression, InputSpec, Provenance
from carddeck.catalog import method_options, method_spec, method_specs
from carddeck.compress.checkpoint import load_card, load_training, save_card, save_training
from carddeck.compress.methods import METHODS, Method, MethodConfig
from carddeck.compress.schedules import LR_SCHEDULES
from carddeck.compress.train import Position, TrainConfig, accuracy, steps_per_epoch, train
from carddeck.data.datasets import Dataset, data_for_cards, load_dataset
from carddeck.data.domains import DOMAINS, augment
from carddeck.errors import InvalidInput
from carddeck.nets import NETS, build_net, count_flops, count_params

log = logging.getLogger(__name__)

for _module in sorted({s.module for s in method_specs().values()}):  # each module declaring a method registers it
    importlib.import_module(f"carddeck.compress.{_module}")

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_DATA = "digits32"  # of a card trained from scratch; one pruned from --init takes the init card's
MIN_CALIB_IMAGES = 32
DEFAULT_CALIB_IMAGES = 1024  # or the whole training set, when smaller
# Methods that prune a trained card (lobs, dsa, dipgo) retrain at this fraction of --lr (the dense
# schedule's peak), cosine to 0: light retraining, as L-OBS, OBC and SparseGPT do. At the dense peak
# (0.1) one epoch undoes the one-shot compensation (L-OBS) and does not repair a magnitude-pruned
# net (15% clean at 90% on digits32); the peak is for learning features, not for repairing them.
FINETUNE_LR_FRACTION = 0.1


@dataclass(frozen=True)
class CompressConfig:
    arch: str
    out: Path
    data: str | None = None  # None: the --init card's dataset (its CardMeta), else DEFAULT_DATA
    domain: str = "clean"
    method: str = "dense"
    sparsity: float = 0.0
    epochs: int | None = None  # None: the method's default (its MethodSpec: 1 for lobs, dsa, dipgo; else 10)
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    jsd: bool = False
    seed: int = 0
    device: str = "auto"
    width: float | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    prune_fraction: float = 0.2
    rounds: int | None = None
    regrow: float = 0.0
    ramp: float = 0.5
    init: Path | None = None
    calib_images: int | None = None  # lobs, dsa, dipgo (None: 1024 or the training set, when smaller)
    allocation: str | None = None  # lobs: uniform, global (default), dsa
    population: int = 8  # dsa
    generations: int = 4  # dsa
    gate_steps: int = 200  # dipgo
    finetune_lr: float | None = None  # lobs, dsa, dipgo (None: FINETUNE_LR_FRACTION x lr)
    corruptions: tuple[str, ...] | None = None  # None: the 15 benchmark corruptions; (): skip
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    name: str | None = None
    version: int = 1
    progress: bool = True
    resume: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # declared method options without a field above

    def training_key(self) -> dict[str, Any]:
        """What must match for --resume to continue a run (not where or how it runs)."""
        skip = {"out", "device", "progress", "resume", "corruptions", "severities", "name", "version"}
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k not in skip}


@dataclass
class CompressResult:
    card: Path
    meta: CardMeta
    history: list[dict[str, Any]]
    params: int
    nonzeros: int
    flops: int
    sparse_flops: int
    corrupted: dict[str, float]  # "name/severity" -> accuracy
    seconds: float  # wall time of calibration and training (not of the final evaluation)


@dataclass
class Plan:
    config: CompressConfig
    device: torch.device
    train_set: Dataset
    val_set: Dataset
    method: Method
    arch_kwargs: dict[str, Any]
    corruptions: tuple[str, ...]
    calib_images: int
    lr: float  # of the training loop: --lr, or the fine-tune rate of methods that prune a trained card


def _check_range(name: str, value: float, low: float, high: float | None = None, *, open_high: bool = True) -> None:
    ok = value >= low and (high is None or (value < high if open_high else value <= high))
    if not ok:
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise InvalidInput(f"{name} must be in {bound}, got {value}")


def _resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise InvalidInput(f"unknown device {device!r}; valid choices: {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("--device cuda: no CUDA device is available; valid here: auto, cpu")
    return torch.device(device)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    x = images.astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 1, 2))
    std = np.maximum(x.std(axis=(0, 1, 2)), 1e-3)
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def plan(config: CompressConfig) -> Plan:
    """Validate ``config`` completely (names, ranges, data, device) without training anything."""
    NETS.get(config.arch)
    method_cls = METHODS.get(config.method)
    DOMAINS.get(config.domain)
    _check_range("sparsity", config.sparsity, 0.0, 1.0)
    if config.schedule not in LR_SCHEDULES:
        raise InvalidInput(f"unknown lr schedule {config.schedule!r}; valid choices: {', '.join(LR_SCHEDULES)}")
    if config.epochs is None:  # in the config from here on, so --resume compares the number trained with
        config = replace(config, epochs=method_spec(config.method).epochs)
    if config.epochs < (0 if method_cls.needs_init else 1):
        raise InvalidInput(f"--epochs must be at least {0 if method_cls.needs_init else 1}, got {config.epochs}")
    if method_cls.needs_init and config.init is None:
        raise InvalidInput(
            f"method {config.method!r} prunes a trained dense card: pass --init DIR/card.pt "
            "(make one with --method dense)"
        )
    one_shot = sorted(m for m in METHODS.names() if METHODS.get(m).needs_init)
    if not method_cls.needs_init and config.calib_images is not None:
        raise InvalidInput(f"--calib-images is for methods {', '.join(one_shot)}; got method {config.method!r}")
    allocating = method_options()["allocation"][1]  # the methods that declare --allocation
    if config.allocation is not None and config.method not in allocating:
        raise InvalidInput(f"--allocation is for methods {', '.join(allocating)}; got method {config.method!r}")
    unknown = sorted(set(config.options) - set(method_options()))
    if unknown:
        raise InvalidInput(f"unknown method options {', '.join(unknown)}; declared: {', '.join(method_options())}")
    if config.population < 2 or config.generations < 1:
        raise InvalidInput(
            "--population must be at least 2 and --generations at least 1, "
            f"got {config.population} and {config.generations}"
        )
    if config.batch_size < 2:
        raise InvalidInput(f"--batch-size must be at least 2 (BatchNorm), got {config.batch_size}")
    _check_range("--lr", config.lr, 0.0)
    if config.finetune_lr is not None:
        if not method_cls.needs_init:
            raise InvalidInput(
                f"--finetune-lr is for methods {', '.join(one_shot)} (others train at --lr); "
                f"got method {config.method!r}"
            )
        _check_range("--finetune-lr", config.finetune_lr, 0.0)
    lr = config.lr
    if method_cls.needs_init:
        lr = config.finetune_lr if config.finetune_lr is not None else FINETUNE_LR_FRACTION * config.lr
    _check_range("--weight-decay", config.weight_decay, 0.0)
    _check_range("--ramp", config.ramp, 0.0, 1.0, open_high=False)
    if config.jsd and config.domain == "clean":
        raise InvalidInput("--jsd needs a random domain to compare views; valid with: augmix, gaussian")
    bad_sev = [s for s in config.severities if s not in (1, 2, 3, 4, 5)]
    if bad_sev or not config.severities:
        raise InvalidInput(f"severities must be a non-empty subset of 1, 2, 3, 4, 5; got {list(config.severities)}")
    corruptions = _resolve_corruptions(config.corruptions)
    device = _resolve_device(config.device)
    if config.data is None:  # the --init card's own dataset, else DEFAULT_DATA
        data = DEFAULT_DATA
        if config.init is not None:
            data = data_for_cards(None, [load_card(config.init)[1].provenance.dataset], f"--init {config.init}")
        config = replace(config, data=data)
    assert config.data is not None

    train_set = load_dataset(config.data, "train")
    val_set = load_dataset(config.data, "val")
    if len(train_set) < config.batch_size:
        raise InvalidInput(
            f"dataset {config.data!r} has {len(train_set)} training images, fewer than --batch-size "
            f"{config.batch_size}; use a batch size of at most {len(train_set)}"
        )
    if len(val_set) == 0:
        raise InvalidInput(f"dataset {config.data!r} has no validation images")

    calib = config.calib_images
    if calib is None:
        calib = min(DEFAULT_CALIB_IMAGES, len(train_set))
    if method_cls.needs_init and not MIN_CALIB_IMAGES <= calib <= len(train_set):
        raise InvalidInput(
            f"--calib-images must be between {MIN_CALIB_IMAGES} and {len(train_set)} (the training images of "
            f"{config.data!r}), got {calib}"
        )
    method = method_cls(
        MethodConfig(
            sparsity=config.sparsity,
            prune_fraction=config.prune_fraction,
            rounds=config.rounds,
            regrow=config.regrow,
            ramp=config.ramp,
            pretrained=config.init is not None,
            seed=config.seed,
            calib_images=calib,
            allocation=config.allocation,
            population=config.population,
            generations=config.generations,
            gate_steps=config.gate_steps,
            options=dict(config.options),
        )
    )
    arch_kwargs = dict(config.arch_kwargs)
    if config.width is not None:
        arch_kwargs["width"] = config.width
    if config.method == "biprop" and "affine_bn" not in arch_kwargs:
        arch_kwargs["affine_bn"] = False  # only scores train (edge-popup / biprop)
    if "mean" not in arch_kwargs and "std" not in arch_kwargs:
        arch_kwargs["mean"], arch_kwargs["std"] = channel_stats(train_set.images)
    probe = build_net(config.arch, train_set.num_classes, **arch_kwargs)  # bad arch kwargs fail here
    method.check(config.arch, probe)
    if config.init is not None:
        if not method.uses_init:
            raise InvalidInput(f"method {config.method!r} does not start from --init weights")
        _, init_meta, init_card = load_card(config.init)
        data_for_cards(config.data, [init_meta.provenance.dataset], f"--init {config.init}")  # says so if not its data
        if init_card["arch"] != config.arch or init_meta.num_classes != train_set.num_classes:
            raise InvalidInput(
                f"--init {config.init} holds a {init_card['arch']} for {init_meta.num_classes} classes; "
                f"need {config.arch} for {train_set.num_classes}"
            )
        arch_kwargs = dict(init_card["arch_kwargs"])
    return Plan(config, device, train_set, val_set, method, arch_kwargs, corruptions, calib, lr)


def _resolve_corruptions(names: tuple[str, ...] | None) -> tuple[str, ...]:
    if names == ():
        return ()
    from carddeck.data.corruptions import BENCHMARK_CORRUPTIONS, CORRUPTIONS

    if names is None:
        return tuple(BENCHMARK_CORRUPTIONS)
    for n in names:
        CORRUPTIONS.get(n)  # InvalidInput listing the valid ones
    return tuple(names)


def corrupted_accuracy(
    model: nn.Module,
    data: Dataset,
    corruptions: tuple[str, ...],
    severities: tuple[int, ...],
    device: torch.device,
    cache: dict[tuple[str, int], np.ndarray] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Accuracy on each corrupted copy of ``data`` (seed 0); keys ``name/severity``."""
    from carddeck.data.corruptions import corrupt

    out = {}
    conditions: Any = [(name, sev) for name in corruptions for sev in severities]
    if progress:  # 75 conditions by default: about a minute on digits32, far more on CIFAR
        from tqdm import tqdm

        conditions = tqdm(conditions, desc="corrupted accuracy", unit="condition", leave=False)
    for name, sev in conditions:
        images = cache.get((name, sev)) if cache is not None else None
        if images is None:
            images = corrupt(data.images, name, sev, seed=0)
            if cache is not None:
                cache[(name, sev)] = images
        out[f"{name}/{sev}"] = accuracy(model, images, data.labels, device)
    return out


def default_name(config: CompressConfig) -> str:
    name = f"{config.arch}-{config.domain}-{config.method}".lower()
    return re.sub(r"[^a-z0-9_-]", "-", name)[:63]


def compress(
    config: CompressConfig,
    *,
    on_epoch_end: Any = None,
    corruption_cache: dict[tuple[str, int], np.ndarray] | None = None,
) -> CompressResult:
    """Train, compress, measure and write one CARD to ``config.out``."""
    p = plan(config)
    config = p.config  # with its dataset resolved
    name = config.name or default_name(config)
    # Name problems surface now, not after training: build a throwaway CardMeta.
    _meta(p, name, 0.0, None, None)
    train_cfg = TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=p.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        schedule=config.schedule,
        domain=config.domain,
        jsd=config.jsd,
        seed=config.seed,
        progress=config.progress,
    )
    torch.manual_seed(config.seed)
    model = build_net(config.arch, p.train_set.num_classes, **p.arch_kwargs)
    if config.init is not None:
        init_model, _, _ = load_card(config.init)
        model.load_state_dict(init_model.state_dict())
    model = p.method.prepare(model).to(p.device)

    start, resume_state, history = Position(), None, []
    if config.resume:
        saved = load_training(config.out)
        if saved is not None:
            if saved["key"] != config.training_key():
                diff = sorted(k for k in saved["key"] if saved["key"][k] != config.training_key().get(k))
                raise InvalidInput(
                    f"--resume: {config.out} holds a run with different settings ({', '.join(diff)}); "
                    "use the same settings or a new --out"
                )
            model.load_state_dict(saved["model"])
            p.method.load_state_dict(saved["method"])
            start, resume_state, history = Position(**saved["position"]), saved, list(saved["history"])
            log.info("resuming from round %d, epoch %d", start.round, start.epoch)
    log.info("%s on %s (%s), %d steps/epoch", p.method.describe(), config.data, config.domain,
             steps_per_epoch(len(p.train_set), config.batch_size))  # fmt: skip

    def checkpoint(pos: Position, optimizer: Any, scheduler: Any, record: dict[str, Any]) -> None:
        history.append(record)
        save_training(
            config.out,
            {
                "key": config.training_key(),
                "position": asdict(pos),
                "model": model.state_dict(),
                "method": p.method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
            },
        )
        if on_epoch_end is not None:
            on_epoch_end(pos, record)

    t0 = time.perf_counter()
    idx = np.sort(np.random.default_rng([config.seed, 5]).choice(len(p.train_set), p.calib_images, replace=False))
    views = augment(p.train_set.images[idx], config.domain, np.random.default_rng([config.seed, 7]))
    p.method.bn_images = (views * 255 + 0.5).astype(np.uint8)  # BatchNorm re-estimation (filter) reads these
    if resume_state is None:
        p.method.calibrate(model, p.train_set.images[idx], p.train_set.labels[idx], p.device, config.progress)
    train(model, p.method, train_cfg, p.train_set, p.val_set, p.device, start=start,
          resume_state=resume_state, on_epoch_end=checkpoint)  # fmt: skip
    seconds = time.perf_counter() - t0

    final = p.method.finalize(model, config.arch, p.arch_kwargs)
    net = final.model.to(p.device).eval()
    clean = accuracy(net, p.val_set.images, p.val_set.labels, p.device)
    corrupted = corrupted_accuracy(
        net, p.val_set, p.corruptions, config.severities, p.device, corruption_cache, config.progress
    )
    mean_corrupted = float(np.mean(list(corrupted.values()))) if corrupted else None
    meta = _meta(p, name, final.sparsity, clean, mean_corrupted)
    card = save_card(config.out, config.arch, final.arch_kwargs, net, meta)
    params, nonzeros = count_params(net)
    h, w = p.train_set.images.shape[1:3]
    log.info("wrote %s: clean %.4f, corrupted %s", card, clean, mean_corrupted)
    return CompressResult(
        card=card,
        meta=meta,
        history=history,
        params=params,
        nonzeros=nonzeros,
        flops=count_flops(net, h, w),
        sparse_flops=count_flops(net, h, w, sparse=True),
        corrupted=corrupted,
        seconds=seconds,
    )


def _meta(p: Plan, name: str, sparsity: float, clean: float | None, corrupted: float | None) -> CardMeta:
    cfg = p.config
    h, w = p.train_set.images.shape[1:3]
    mean = tuple(float(v) for v in p.arch_kwargs.get("mean", (0.0, 0.0, 0.0)))
    std = tuple(float(v) for v in p.arch_kwargs.get("std", (1.0, 1.0, 1.0)))
    method = p.method
    split = f"{cfg.data}:val"
    if corrupted is not None:
        split += f" (corrupted: mean over {len(p.corruptions)} corruptions x severities {list(cfg.severities)})"
    return CardMeta(
        name=name,
        version=cfg.version,
        architecture=cfg.arch,
        num_classes=p.train_set.num_classes,
        class_names=p.train_set.class_names,
        input=InputSpec(height=int(h), width=int(w), mean=mean, std=std),
        compression=Compression(
            method=method.name,
            sparsity=float(sparsity),
            weight_bits=method.weight_bits,
            structured=method.structured,
            **method.compression_fields(),
        ),
        domain=cfg.domain,
        accuracy=Accuracy(clean=clean, corrupted=corrupted, split=split),
        provenance=Provenance(
            dataset=cfg.data,
            seed=cfg.seed,
            package_version=carddeck.__version__,
            created=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        ),
    )
