"""The live shift signal: the detector (:mod:`carddeck.gating.shift`) on live traffic, per model.

:class:`ShiftMonitor` judges every routed request of a micro-batch at once (``Dataplane.judge``): a request
of at least ``min_batch`` images is tested as a batch; smaller ones feed a sliding window of the model's
last ``window`` images, tested every ``stride`` new images, and get the state of the latest window. Every
image gets its out-of-scope score and risk. The answers carry it (:class:`~carddeck.gating.shift.Trust`)
and the metrics count it. It never raises into the request path.

:class:`ShiftLoader` follows the deck: it reads the detector the manifest names through the deck's store
(local or S3), and when there is none for the current cards it refits one in the background from the
calibration images the deck stores (state ``unknown`` until then; logged and counted), and may store the
refitted detector in the deck, so that replicas that do not refit (Ray Serve's ingress) load it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from carddeck.errors import InvalidInput
from carddeck.gating.shift import SIZES, UNKNOWN, ShiftDetector, Trust, Verdict, image_features, image_risk

if TYPE_CHECKING:
    from carddeck.deck import Deck
    from carddeck.observability.metrics import Metrics

log = logging.getLogger(__name__)


class Observed(NamedTuple):
    """One request as the monitor reads it: its prepared images, the deck's probabilities, the gate's features
    (None: computed here) and the cards' agreement per image (None: unknown; the detector judges without it)."""

    x: np.ndarray
    probabilities: np.ndarray
    gate_features: np.ndarray | None = None
    agreement: np.ndarray | None = None


class ShiftMonitor:
    """Runs the detector on live traffic, per model, reports to ``metrics`` and answers each request."""

    def __init__(
        self, metrics: Metrics | None = None, *, window: int = 32, stride: int = 8, min_batch: int = 16
    ) -> None:
        if window < SIZES[0] or stride < 1 or min_batch < SIZES[0]:
            raise InvalidInput(
                f"shift window and min batch must be >= {SIZES[0]} and stride >= 1; got {window}, {min_batch}, {stride}"
            )
        self.metrics = metrics
        self.window, self.stride, self.min_batch = window, stride, min_batch
        self.detector: ShiftDetector | None = None
        # (features, score, agreement, answer) per image
        self._windows: dict[str, deque[tuple[np.ndarray, float, float, int]]] = {}
        self._pending: dict[str, int] = {}
        self._last: dict[str, Verdict] = {}  # latest window verdict per model
        self._lock = threading.Lock()

    def set_detector(self, detector: ShiftDetector | None) -> None:
        with self._lock:
            self.detector = detector
            self._windows.clear()
            self._pending.clear()
            self._last.clear()
        if self.metrics is not None:
            self.metrics.set_shift_detector(detector)

    def __call__(self, predicted: Sequence[Any]) -> None:
        """``Dataplane.on_predict`` listener (metrics only); the server uses :meth:`judge`."""
        self.judge(predicted)

    def judge(self, predicted: Sequence[Any], cards: Collection[str] | None = None) -> list[Trust]:
        """Each routed request of one micro-batch, ``RoutedRequest(model, x, routing, probabilities[, agreement])``,
        in order -> its verdict. Unknown verdicts (never an exception) when the detector is missing or fails.
        ``cards``: the keys of the deck the requests ran on; a detector fitted for other cards (the deck changed
        under them, its detector not swapped yet) leaves them unknown rather than judge them wrongly."""
        out: list[Trust | None] = [None] * len(predicted)
        rows = [tuple(p) for p in predicted]  # a RoutedRequest, or a plain tuple of its fields
        by_model: dict[str, list[int]] = {}
        for i, (model, *_) in enumerate(rows):
            by_model.setdefault(model, []).append(i)
        for model, idx in by_model.items():
            requests = [Observed(r[1], r[3], getattr(r[2], "features", None), *r[4:5]) for r in (rows[i] for i in idx)]
            try:
                for i, trust in zip(idx, self._judge_model(model, requests, cards=cards)):
                    out[i] = trust
            except Exception:  # the shift signal must never fail a prediction
                log.exception("shift monitor failed on %d requests of %s", len(requests), model)
        return [t if t is not None else Trust.unknown(len(r[1]), r[3]) for t, r in zip(out, rows)]

    def observe(
        self,
        model: str,
        x: np.ndarray,
        probabilities: np.ndarray,
        gate_features: np.ndarray | None = None,
        agreement: np.ndarray | None = None,
    ) -> list[Verdict]:
        """One request's prepared images and probabilities; returns the verdicts (tests) it caused."""
        return self.observe_many(model, [Observed(x, probabilities, gate_features, agreement)])

    def observe_many(self, model: str, requests: Sequence[Sequence[Any]]) -> list[Verdict]:
        """Several requests of ``model`` in order (a micro-batch), each an :class:`Observed` or a tuple of its
        fields -> the batch and window tests they caused."""
        tested: list[Verdict] = []
        self._judge_model(model, [Observed(*r) for r in requests], tested)
        return tested

    def _judge_model(
        self,
        model: str,
        requests: Sequence[Observed],
        tested: list[Verdict] | None = None,
        cards: Collection[str] | None = None,
    ) -> list[Trust]:
        detector = self.detector  # read once: a swap meanwhile does not mix two detectors in one verdict
        if detector is None or (cards is not None and not fits(detector, cards)):
            return [Trust.unknown(len(r.x), r.probabilities) for r in requests]
        xs, ps, gates, agrees = zip(*requests)
        one = len(requests) == 1  # the common case of a lone request: no copies
        bounds = [0]
        for x in xs:
            bounds.append(bounds[-1] + len(x))
        # a request of min_batch images or more is tested on min_batch evenly spaced ones (bounds the cost);
        # smaller ones feed the window with all of theirs
        picks = {
            j: np.linspace(bounds[j], bounds[j + 1] - 1, self.min_batch).round().astype(np.int64)
            for j, x in enumerate(xs)
            if len(x) >= self.min_batch
        }
        rows = None  # the images whose photometric statistics anything reads: the tested ones, unless the scope does
        if picks and not detector.scope.reads_photometric:
            rows = np.concatenate([picks.get(j, np.arange(bounds[j], bounds[j + 1])) for j in range(len(xs))])
        probabilities = ps[0] if one else np.concatenate(ps)
        features = image_features(
            xs[0] if one else np.concatenate(xs),
            probabilities,
            None if any(g is None for g in gates) else gates[0] if one else np.concatenate(gates),
            rows,
        )
        scores = detector.image_scores(features)
        risks = image_risk(probabilities, scores)
        # the cards' agreement per image (NaN: unknown, e.g. a caller that does not pass it: the detector then
        # judges without it)
        known = [np.full(len(x), np.nan, np.float32) if a is None else a for x, a in zip(xs, agrees)]
        agreement = known[0] if one else np.concatenate(known)
        answers = probabilities.argmax(axis=1)  # the class mix reads every image of a request, not a sample
        units: list[str] = []
        # (request, features, scores, agreement, answers)
        due: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        with self._lock:
            for j, request in enumerate(requests):
                pick = picks.get(j)
                mine = slice(bounds[j], bounds[j + 1])
                if pick is not None:
                    units.append("batch")
                    due.append((j, features[pick], scores[pick], agreement[pick], answers[mine]))
                    continue
                units.append("window")
                window = self._windows.setdefault(model, deque(maxlen=self.window))
                window.extend(zip(features[mine], scores[mine], agreement[mine], answers[mine]))
                self._pending[model] = self._pending.get(model, 0) + len(request.x)
                if len(window) == self.window and self._pending[model] >= self.stride:
                    self._pending[model] = 0
                    f, s, a, y = zip(*window)
                    due.append((j, np.stack(f), np.array(s), np.array(a, np.float32), np.array(y)))
        results = {j: detector.test(f, s, a, y) for j, f, s, a, y in due}
        trusts = []
        for j, unit in enumerate(units):
            v = results.get(j)
            if v is not None:
                if tested is not None:
                    tested.append(v)
                if self.metrics is not None:
                    self.metrics.observe_shift(model, unit, v)
                if unit == "window":
                    with self._lock:
                        self._last[model] = v
            elif unit == "window":
                v = self._last.get(model)
            mine = slice(bounds[j], bounds[j + 1])
            if v is None:
                trusts.append(Trust(UNKNOWN, "none", float("nan"), "unknown", scores[mine], risks[mine]))
            else:
                trusts.append(
                    Trust(v.state, unit, v.expected_accuracy, v.expected_kind, scores[mine], risks[mine], v.covered_by)
                )
        return trusts


def fits(detector: ShiftDetector, cards: Collection[str]) -> bool:
    """Whether ``detector`` was fitted for the deck of these card keys (one that does not say is taken to)."""
    fitted = detector.notes.get("cards")
    return fitted is None or sorted(fitted) == sorted(cards)


RETRY_S, RETRY_MAX_S = 2.0, 60.0  # a failed refit is tried again after 2 s, then 4, 8, ... at most every minute


class ShiftLoader:
    """Deck-swap listener (``dataplane.on_swap``): loads the deck's shift detector into ``monitor`` (read
    through the deck's store) when the manifest names one fitted for the deck's cards; otherwise serves
    ``unknown`` and refits one in the background from the deck's calibration images (``refit``: False to
    leave the signal unknown). ``on_refit(outcome, seconds)`` is told how each refit ended. ``store_refit``:
    write a refitted detector into the deck (its store's manifest) while the store still has those cards, so
    that replicas sharing the deck and a restarted server load it rather than refit."""

    def __init__(
        self,
        monitor: ShiftMonitor,
        *,
        refit: bool = True,
        on_refit: Callable[[str, float], None] | None = None,
        store_refit: bool = False,
        retry_s: float | None = RETRY_S,
    ) -> None:
        self.monitor = monitor
        self.refit = refit
        self.retry_s = retry_s  # first wait before a failed refit is tried again (None: never)
        self.on_refit = on_refit
        self.store_refit = store_refit
        self._key: tuple[str | None, tuple[str, ...]] | None = None  # (detector file, cards) last given
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def __call__(self, deck: Deck) -> None:
        rel = dict(deck.manifest.gate).get("shift")
        cards = sorted(c.key for c in deck.cards)
        key = (rel, tuple(cards))
        with self._lock:
            if key == self._key:
                return
            self._key = key
        detector = self._stored(deck, rel, cards)
        self.monitor.set_detector(detector)
        if detector is None and self.refit and cards:
            thread = threading.Thread(target=self._refit, args=(deck, key), name="carddeck-shift-refit", daemon=True)
            self._thread = thread
            thread.start()

    def _stored(self, deck: Deck, rel: str | None, cards: list[str]) -> ShiftDetector | None:
        if not rel:
            log.info("deck version %d has no shift detector; shift state unknown until one is fitted", deck.version)
            return None
        try:
            import io

            detector = ShiftDetector.load(io.BytesIO(deck.store.read_file(rel)), name=rel)  # type: ignore[union-attr]
        except (InvalidInput, OSError) as exc:  # serve on with state unknown rather than refuse the deck
            log.warning("deck version %d: shift detector %s unusable: %s", deck.version, rel, exc)
            return None
        except Exception as exc:  # a store error: the refit has the same store to read, so say why
            log.warning("deck version %d: cannot read shift detector %s: %s", deck.version, rel, exc)
            return None
        if not fits(detector, cards):
            log.warning(
                "deck version %d: the shift detector was fitted for cards %s, the deck has %s; state unknown "
                "until it is refitted", deck.version, ", ".join(sorted(detector.notes["cards"])), ", ".join(cards),
            )  # fmt: skip
            return None
        return detector

    def _refit(self, deck: Deck, key: tuple[str | None, tuple[str, ...]]) -> None:
        # A refit that fails for a passing reason (a card's replica lost under it on Ray, a store that did not
        # answer) is tried again, later each time, for as long as these are the deck's cards: nothing else would
        # try again before the deck changes, and the state would stay unknown. A deck it cannot be refitted
        # from (InvalidInput: no calibration images) is not.
        delay = self.retry_s
        while not self._refit_once(deck, key) and delay is not None:
            time.sleep(delay)
            with self._lock:
                if self._key != key:
                    return
            delay = min(2 * delay, RETRY_MAX_S)

    def _refit_once(self, deck: Deck, key: tuple[str | None, tuple[str, ...]]) -> bool:
        """One refit; False when it failed and may succeed if tried again."""
        from carddeck.gating.shift_fit import refit_from_deck

        start = time.monotonic()
        log.info("deck version %d: refitting the shift detector from the deck's calibration images", deck.version)
        retry = False
        try:
            detector = refit_from_deck(deck)
        except InvalidInput as exc:
            outcome = "failed"
            log.warning("deck version %d: shift detector refit failed, state stays unknown: %s", deck.version, exc)
        except Exception as exc:
            outcome, retry = "failed", self.retry_s is not None
            again = f"; trying again in {self.retry_s:g} s or more" if retry else ""
            log.warning("deck version %d: shift detector refit failed, state unknown: %s%s", deck.version, exc, again)
        else:
            outcome = "ok"
            with self._lock:
                current = self._key == key
            if current:  # a later deck version would be judged by a detector for other cards
                self.monitor.set_detector(detector)
                log.info(
                    "deck version %d: shift detector refitted in %.1f s (%d conditions, label-free)",
                    deck.version, time.monotonic() - start, len(detector.conditions),
                )  # fmt: skip
                rel = self._store(deck, detector) if self.store_refit else None
                with self._lock:
                    if rel is not None and self._key == key:  # the deck version it makes names what this serves:
                        self._key = (rel, key[1])  # keep it (and its windows) rather than reload it
            else:
                outcome = "stale"
        if self.on_refit is not None:
            self.on_refit(outcome, time.monotonic() - start)
        return not retry

    @staticmethod
    def _store(deck: Deck, detector: ShiftDetector) -> str | None:
        """Into the deck's manifest -> where it is stored; None (logged) where the deck is read-only, its cards
        changed since (a detector for other cards would be refused by every loader anyway), or another process
        stored a detector since (a replica's refit of the same cards): a race here costs a refit, never a
        wrong verdict."""
        store, cards = deck.store, sorted(detector.notes.get("cards", ()))
        try:
            if store is None or store.read_only:
                log.info("deck version %d: refitted shift detector kept in memory: the deck is read-only", deck.version)
                return None
            manifest = store.manifest()
            if sorted(e.key for e in manifest.active()) != cards:
                log.info("deck version %d: refitted shift detector not stored: the deck's cards changed", deck.version)
                return None
            if dict(manifest.gate).get("shift") != dict(deck.manifest.gate).get("shift"):
                log.info(
                    "deck version %d: refitted shift detector not stored: deck version %d has another one",
                    deck.version, manifest.version,
                )  # fmt: skip
                return None
            stored = store.set_gate(shift=detector)
        except Exception as exc:  # an unreachable store: this process keeps its detector
            log.warning("deck version %d: the refitted shift detector could not be stored: %s", deck.version, exc)
            return None
        log.info("deck version %d: refitted shift detector stored as deck version %d", deck.version, stored.version)
        return str(dict(stored.gate)["shift"])

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for a running refit (tests, shutdown); True when none is running."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            return not thread.is_alive()
        return True


__all__ = ["ShiftLoader", "ShiftMonitor", "fits"]
