"""The learned scorer: rank parents by the piece cost a trained model predicts for them.

``remora trainer`` (plugins/trainer/) fits gradient-boosted trees on the download history
(:mod:`.history`) and publishes them as ``DIR/model-NNNNNN.json``. This module

* reads such a file into a :class:`CostModel` — plain JSON (trees as arrays), never pickle: the scheduler
  runs as root and a model file must not be able to run code; every index and shape is checked;
* predicts with numpy, all trees and all candidates at once, one step of depth per iteration (~0.1 ms
  for 40 candidates and 100 trees of depth <= 8);
* watches the directory (:class:`ModelWatcher`: at most one ``stat`` a second; a new file is loaded
  without a restart) and refuses a model that is stale (older than ``max_age_s``), whose validation
  error is above ``max_error``, or that did not beat the naive predictor on held-out history by
  ``min_advantage`` (its advantage is not proven): then :class:`LearnedScorer` scores with the weighted
  scorer and says so (log, ``remora_scheduler_scorer{kind}``, ``remora_scheduler_scorer_fallbacks_total{reason}``).

What the model predicts (``target``): ``log_unshared_seconds_per_mib`` — the cost of a MiB from the
parent *if it served that piece alone*. The scorer multiplies by the parent's transfers now + 1
(``parent_load``): load is a known, monotone factor; left to the trees (which cannot extrapolate it
beyond the loads they saw, and learn it from history where it goes with everything else) children herded
onto the swarm's seeds, up to ~85 transfers each, at 50 nodes (docs/p2p.md).
The older ``log_seconds_per_mib`` (cost as observed, load inside) still loads.

Confidence, twice:

* a decision is left to the weighted scorer (reason ``no_separation``) when the model's predictions for
  its candidates spread less (sample standard deviation of the log) than ``separation`` times the model's
  own held-out median absolute log error: the model cannot tell those parents apart, and a ranking by its
  noise did worse than the weighted score on equal links (benchmarks/bench_parent_learning.py);
* when the model does rank, predictions closer than its error are ties: each candidate's predicted cost
  (with its load multiplied in) falls in a *tier*, ``floor(ln(cost_i / best cost) / (tie x log error))``,
  and within a tier the weighted score orders the candidates. Ranking 1 Gbit/s above 10 Mbit/s is the
  model's job; ordering two parents 10 % apart, when its own error is 40 %, is not (ranking on its
  noise is what lost learned p95 on equal links before these rules: docs/p2p.md).

Score of a candidate (higher is better; the tier dominates, the weighted score is in [0, 1])::

    score_i = -tier_i + weighted_i

Load: the cost is the unshared prediction times ``parent_load + 1`` — the transfers running from the
parent now (children list them in their announcements) plus the one this answer adds. Transfers a
child starts from parents handed out a moment ago count once its next announcement lists them (peers
announce every 0.25 s; the simulation at once, so that lag is not measured).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from remora.errors import InvalidInput

from .selection import FEATURE_NAMES, Candidate, WeightedScorer

log = logging.getLogger(__name__)

MODEL_FORMAT = "remora-cost-model/1"
TARGET = "log_unshared_seconds_per_mib"   # natural log of the cost per MiB with the parent serving only it
SHARED_TARGET = "log_seconds_per_mib"     # the older target: the cost per MiB as observed (load inside)
TARGETS = (TARGET, SHARED_TARGET)
LOAD = FEATURE_NAMES.index("parent_load")
MIB = 1 << 20
MODEL_RE = re.compile(r"^model-(\d{6,})\.json$")
MAX_MODEL_BYTES = 64 << 20
MAX_TREES = 2000
MAX_NODES = 1 << 13                 # per tree
MAX_DEPTH = 64
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0
DEFAULT_MAX_ERROR = 0.5             # median relative error of the predicted piece cost on held-out history
DEFAULT_MIN_ADVANTAGE = 0.2         # held-out median abs log error at most 80 % of the naive predictor's
DEFAULT_SEPARATION = 2.0            # see the module doc: spread of predictions / the model's log error
DEFAULT_TIE = 1.0                   # see the module doc: width of a tier in units of the model's log error


@dataclass
class CostModel:
    """Gradient-boosted regression trees over :data:`FEATURE_NAMES`, padded into [tree, node] arrays.

    Leaves point to themselves, so walking ``depth`` steps from the root lands every (tree, row) on its
    leaf whatever the depth of its own path."""

    meta: dict
    feature: np.ndarray        # int   [T, N]
    threshold: np.ndarray      # float [T, N]
    missing_left: np.ndarray   # bool  [T, N]
    left: np.ndarray           # int   [T, N]  (absolute index into the flattened [T*N])
    right: np.ndarray
    value: np.ndarray          # float [T*N]
    baseline: float
    depth: int
    path: str = ""

    @property
    def version(self) -> int:
        return int(self.meta.get("version", 0))

    @property
    def created(self) -> float:
        return float(self.meta.get("created", 0.0))

    @property
    def error(self) -> float:
        return float(self.meta.get("validation", {}).get("median_rel_error", math.inf))

    @property
    def log_error(self) -> float:
        """Held-out median absolute error of the predicted log cost (older files: from the relative error)."""
        v = self.meta.get("validation", {})
        got = v.get("median_abs_log_error")
        return float(got) if isinstance(got, (int, float)) else math.log1p(self.error)

    @property
    def advantage(self) -> float | None:
        """1 - (model's held-out median abs log error) / (the naive predictor's); None if not validated."""
        v = self.meta.get("validation", {})
        naive = v.get("naive", {}).get("median_abs_log_error") if isinstance(v.get("naive"), dict) else None
        mine = v.get("median_abs_log_error")
        if not isinstance(naive, (int, float)) or not isinstance(mine, (int, float)) or not naive > 0:
            return None
        return 1.0 - float(mine) / float(naive)

    @property
    def unshared(self) -> bool:
        return self.meta.get("target") == TARGET

    @classmethod
    def from_doc(cls, doc: dict, path: str = "") -> CostModel:
        """Check a model document field by field (InvalidInput names what is wrong)."""
        def bad(why: str) -> InvalidInput:
            return InvalidInput(f"model {path or '(document)'}: {why}")

        if not isinstance(doc, dict) or doc.get("format") != MODEL_FORMAT:
            raise bad(f"format must be {MODEL_FORMAT!r}")
        if doc.get("features") != list(FEATURE_NAMES):
            raise bad("its feature list differs from this scheduler's (retrain with this version)")
        if doc.get("target") not in TARGETS:
            raise bad(f"target must be one of {TARGETS}")
        for key in ("version", "created", "training_rows"):
            if not isinstance(doc.get(key), (int, float)) or isinstance(doc.get(key), bool):
                raise bad(f"{key} must be a number")
        val = doc.get("validation")
        if not isinstance(val, dict) or not isinstance(val.get("median_rel_error"), (int, float)):
            raise bad("validation.median_rel_error is required")
        baseline = doc.get("baseline")
        trees = doc.get("trees")
        if not isinstance(baseline, (int, float)) or not math.isfinite(baseline):
            raise bad("baseline must be a finite number")
        if not isinstance(trees, list) or not 1 <= len(trees) <= MAX_TREES:
            raise bad(f"trees must be a list of 1..{MAX_TREES}")
        n_feat = len(FEATURE_NAMES)
        width = 0
        parsed = []
        for t, tree in enumerate(trees):
            try:
                cols = {k: np.asarray(tree[k]) for k in ("feature", "threshold", "missing_left", "left", "right",
                                                         "value", "leaf")}
            except (KeyError, TypeError, ValueError) as exc:
                raise bad(f"tree {t}: {exc}") from None
            n = len(cols["value"])
            if not 1 <= n <= MAX_NODES or any(c.shape != (n,) for c in cols.values()):
                raise bad(f"tree {t}: columns must be 1..{MAX_NODES} long and equal")
            try:
                leaf = cols["leaf"].astype(bool)
                feat = cols["feature"].astype(np.int64)
                left = cols["left"].astype(np.int64)
                right = cols["right"].astype(np.int64)
                thr = cols["threshold"].astype(np.float64)
                val_ = cols["value"].astype(np.float64)
                miss = cols["missing_left"].astype(bool)
            except (TypeError, ValueError) as exc:
                raise bad(f"tree {t}: {exc}") from None
            inner = ~leaf
            if np.any((feat[inner] < 0) | (feat[inner] >= n_feat)):
                raise bad(f"tree {t}: feature index out of range")
            if np.any((left[inner] <= np.flatnonzero(inner)) | (left[inner] >= n)
                      | (right[inner] <= np.flatnonzero(inner)) | (right[inner] >= n)):
                raise bad(f"tree {t}: children must come after their node and inside the tree")
            if not np.all(np.isfinite(val_[leaf])) or np.any(np.isnan(thr[inner])):
                raise bad(f"tree {t}: leaf values must be finite, thresholds numbers")
            parsed.append((feat, thr, miss, left, right, val_, leaf))
            width = max(width, n)
        T = len(parsed)
        feature = np.zeros((T, width), np.int64)
        threshold = np.zeros((T, width))
        missing_left = np.zeros((T, width), bool)
        left = np.zeros((T, width), np.int64)
        right = np.zeros((T, width), np.int64)
        value = np.zeros((T, width))
        depth = 0
        for t, (feat, thr, miss, lft, rgt, val_, leaf) in enumerate(parsed):
            n = len(val_)
            idx = np.arange(n)
            base = t * width
            feature[t, :n] = np.where(leaf, 0, feat)
            threshold[t, :n] = np.where(leaf, np.inf, thr)
            missing_left[t, :n] = np.where(leaf, True, miss)
            left[t, :n] = base + np.where(leaf, idx, lft)        # a leaf loops onto itself
            right[t, :n] = base + np.where(leaf, idx, rgt)
            left[t, n:] = right[t, n:] = base + np.arange(n, width)
            value[t, :n] = np.where(leaf, val_, 0.0)
            depth = max(depth, _depth(lft, rgt, leaf))
        if depth > MAX_DEPTH:
            raise bad(f"trees deeper than {MAX_DEPTH}")
        meta = {k: v for k, v in doc.items() if k != "trees"}
        return cls(meta=meta, feature=feature, threshold=threshold, missing_left=missing_left, left=left,
                   right=right, value=value.reshape(-1), baseline=float(baseline), depth=depth, path=path)

    def predict_log(self, X: np.ndarray) -> np.ndarray:
        """Natural log of the cost per MiB for each row of ``X`` ([rows, features], NaN = unknown)."""
        X = np.ascontiguousarray(X, dtype=np.float64)
        rows, n_feat = X.shape
        T, W = self.feature.shape
        flat_x = X.reshape(-1)
        nan_x = np.isnan(flat_x)
        row_off = np.tile(np.arange(rows) * n_feat, T)                     # [T*rows]
        node = np.repeat(np.arange(T) * W, rows)                           # flat node index per (tree, row)
        feature, threshold, missing, child = self._flat
        size = child.shape[1]
        for _ in range(self.depth):
            at = row_off + feature[node]
            go_right = ~((flat_x[at] <= threshold[node]) | (nan_x[at] & missing[node]))
            node = child.reshape(-1)[go_right * size + node]
        return self.baseline + self.value[node].reshape(T, rows).sum(axis=0)

    @property
    def _flat(self):
        flat = self.__dict__.get("_flat_cache")
        if flat is None:
            flat = self.__dict__["_flat_cache"] = (
                self.feature.reshape(-1), self.threshold.reshape(-1), self.missing_left.reshape(-1),
                np.stack([self.left.reshape(-1), self.right.reshape(-1)]))
        return flat

    def predict_cost(self, X: np.ndarray, size: int = MIB, log_pred: np.ndarray | None = None) -> np.ndarray:
        """Predicted seconds for a piece of ``size`` bytes from each parent as loaded now (an unshared
        prediction times the parent's transfers + 1). ``log_pred``: :meth:`predict_log` of ``X`` if known."""
        log_pred = self.predict_log(X) if log_pred is None else log_pred
        cost = np.exp(log_pred) * (size / MIB)
        if self.unshared:
            cost = cost * (1.0 + np.nan_to_num(np.maximum(X[:, LOAD], 0.0)))
        return cost


def _depth(left, right, leaf) -> int:
    depth = {0: 0}
    best = 0
    for i in range(len(leaf)):       # children come after their node: one pass
        d = depth.get(i, 0)
        best = max(best, d)
        if not leaf[i]:
            depth[int(left[i])] = depth[int(right[i])] = d + 1
    return best


def _spread(log_pred: np.ndarray) -> float:
    """How far apart the model puts the candidates: the sample standard deviation of the predicted log
    costs (the range was tried: one odd candidate among 40 on equal links stretched it past the gate)."""
    return float(np.std(log_pred, ddof=1)) if len(log_pred) > 1 else 0.0


def features_matrix(candidates: list[Candidate]) -> np.ndarray:
    nan = math.nan
    return np.array([[nan if v is None else v for v in c.features.raw] for c in candidates], dtype=np.float64)


# -- files -----------------------------------------------------------------------------------------------

def model_files(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in d.iterdir() if (m := MODEL_RE.match(p.name)))


def load_model(path: str | os.PathLike) -> CostModel:
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_MODEL_BYTES:
            raise InvalidInput(f"model {p}: {size} bytes, more than {MAX_MODEL_BYTES}")
        doc = json.loads(p.read_bytes())
    except OSError as exc:
        raise InvalidInput(f"model {p}: {exc}") from None
    except ValueError as exc:
        raise InvalidInput(f"model {p}: not JSON ({exc})") from None
    return CostModel.from_doc(doc, str(p))


def publish_model(directory: str | os.PathLike, doc: dict, keep: int = 5) -> Path:
    """Write ``doc`` as the next version, atomically (temp file, fsync, rename, fsync the directory):
    a scheduler polling the directory sees the whole new file or none. Older versions beyond ``keep`` go."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    existing = model_files(d)
    version = (existing[-1][0] + 1) if existing else 1
    doc = dict(doc, version=version)
    CostModel.from_doc(doc, "(to publish)")          # never publish what a scheduler would refuse
    final = d / f"model-{version:06d}.json"
    fd, tmp = tempfile.mkstemp(prefix=".model-", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, separators=(",", ":"), allow_nan=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    for _, old in model_files(d)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return final


class ModelWatcher:
    """The newest usable model of a directory, re-checked at most every ``poll_s`` seconds."""

    def __init__(self, directory: str | os.PathLike, max_age_s: float = DEFAULT_MAX_AGE_S,
                 max_error: float = DEFAULT_MAX_ERROR, poll_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 min_advantage: float = DEFAULT_MIN_ADVANTAGE):
        self.dir = Path(directory)
        self.max_age_s = max_age_s
        self.max_error = max_error
        self.min_advantage = min_advantage
        self.poll_s = poll_s
        self.clock = clock
        self.wall = wall
        self.model: CostModel | None = None
        self._seen: tuple | None = None
        self._next_poll = -math.inf
        self.load_errors = 0

    def _poll(self) -> None:
        now = self.clock()
        if now < self._next_poll:
            return
        self._next_poll = now + self.poll_s
        files = model_files(self.dir)
        if not files:
            if self.model is not None:
                log.info("model directory %s is empty: the learned scorer falls back", self.dir)
            self.model, self._seen = None, None
            return
        _, newest = files[-1]
        try:
            st = newest.stat()
        except OSError:
            return
        key = (newest.name, st.st_mtime_ns, st.st_size)
        if key == self._seen:
            return
        self._seen = key
        try:
            model = load_model(newest)
        except InvalidInput as exc:
            self.load_errors += 1
            log.warning("%s; keeping %s", exc, f"model v{self.model.version}" if self.model else "no model")
            return
        log.info("loaded model v%d from %s (%d training rows, validation median relative error %.3f)",
                 model.version, newest, model.meta.get("training_rows", 0), model.error)
        self.model = model

    def current(self) -> tuple[CostModel | None, str]:
        """(model, "") when a usable one is loaded, else (None, why: no_model, stale, error_too_high,
        no_advantage: the file does not show the model beating the naive predictor by ``min_advantage``)."""
        self._poll()
        m = self.model
        if m is None:
            return None, "no_model"
        if self.wall() - m.created > self.max_age_s:
            return None, "stale"
        if not m.error <= self.max_error:
            return None, "error_too_high"
        adv = m.advantage
        if adv is None or adv < self.min_advantage:
            return None, "no_advantage"
        return m, ""


class LearnedScorer:
    """Score by predicted piece cost; the weighted scorer whenever no usable model is there."""

    name = "learned"

    def __init__(self, watcher: ModelWatcher, fallback: WeightedScorer | None = None,
                 separation: float = DEFAULT_SEPARATION, tie: float = DEFAULT_TIE):
        self.watcher = watcher
        self.fallback = fallback or WeightedScorer()
        self.separation = separation    # 0: always trust the model's ranking
        self.tie = tie                  # 0: no ties, the predicted cost alone ranks
        self.metrics = None             # SchedulerMetrics, set by the service
        self.kind = "weighted"          # what scored the last decision: learned or weighted (fallback)
        self.reason = "no_model"

    def _set_kind(self, kind: str, reason: str) -> None:
        # INFO on a switch between "a model is usable" and a fallback reason; per-decision confidence
        # (no_separation) is DEBUG and counted in the metrics, it may change every decision.
        def state(r):
            return "model" if r in ("", "no_separation") else r

        if state(reason) != state(self.reason):
            if state(reason) == "model":
                log.info("learned scorer: using model v%d", self.watcher.model.version)
            else:
                log.info("learned scorer: falling back to the weighted scorer (%s)", reason)
        self.kind, self.reason = kind, reason
        if self.metrics is not None:
            self.metrics.scorer_kind(kind, reason)
            self.metrics.model_version.set(self.watcher.model.version if self.watcher.model else 0)

    def score(self, child_id: str, candidates: list[Candidate]) -> None:
        if not candidates:
            return
        model, reason = self.watcher.current()
        if model is None:
            self._set_kind("weighted", reason)
            self.fallback.score(child_id, candidates)
            log.debug("child %s: weighted scores (fallback: %s)", child_id, reason)
            return
        X = features_matrix(candidates)
        log_pred = model.predict_log(X)
        spread = _spread(log_pred)
        if spread < self.separation * model.log_error:
            # The model cannot tell these parents apart better than its own error: its ranking would be
            # noise (with equal links it lost to the weighted score). The weighted scorer decides.
            self._set_kind("weighted", "no_separation")
            self.fallback.score(child_id, candidates)
            log.debug("child %s: weighted scores (model v%d spread %.3f < %.1f x error %.3f)", child_id,
                      model.version, spread, self.separation, model.log_error)
            return
        self._set_kind("learned", "")
        costs = model.predict_cost(X, log_pred=log_pred)
        log_cost = np.log(np.maximum(costs, 1e-12))
        gap = log_cost - log_cost.min()
        band = self.tie * model.log_error
        tiers = np.floor(gap / band) if band > 0 else gap      # no band: the cost alone (weighted: 1e-9 x)
        scale = 0.999 if band > 0 else 1e-9                     # a tier outranks any weighted score
        for cand, cost, tier in zip(candidates, costs, tiers):
            cand.predicted_cost = float(cost)
            cand.score = -float(tier) + scale * self.fallback.value(cand.features)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("child %s: model v%d predicts %s", child_id, model.version,
                      ", ".join(f"{c.peer_id}={c.predicted_cost * 1000:.1f}ms" for c in candidates[:8]))

    def chosen(self, parents: list[Candidate]) -> None:
        """The parents handed out: their predicted costs go to the metrics."""
        if self.metrics is None:
            return
        for c in parents:
            if c.predicted_cost is not None:
                self.metrics.predicted_cost.observe(c.predicted_cost)

    def observe(self, parent_id: str, size: int, cost_s: float, success: bool) -> None:
        self.fallback.observe(parent_id, size, cost_s, success)

    def forget(self, peer_id: str) -> None:
        self.fallback.forget(peer_id)

