"""Fit, validate and publish the cost model of the learned scorer (plugins/scheduler/learned.py).

Input: the download history (plugins/scheduler/history.py): per row, the chosen parent's features at
choice time and the piece cost that followed. Target: the natural log of the *unshared* cost per MiB
(costs span three orders of magnitude between a 10 Mbit/s and a 1 Gbit/s uplink; the log makes the loss
relative): a raw cost (row ``norm`` false) is divided by the parent's transfers at choice time + 1, a
peer's report is already divided by its uploads. The scheduler multiplies the load back in
(plugins/scheduler/learned.py), so load is a monotone factor the trees never have to extrapolate.
``TrainConfig.unshared=False`` keeps the older target (the cost as observed), ``drop`` blanks features
(both for the ablation of benchmarks/bench_parent_learning.py).

Model: scikit-learn's ``HistGradientBoostingRegressor`` — gradient-boosted trees that take unknown
features (NaN: no probe yet, nothing declared) natively, train on a million rows in seconds on two cores,
and export to plain arrays that the scheduler evaluates with numpy, never by unpickling.

Validation: the newest ``holdout`` share of the rows (by time: the model is judged on the future, as it
will be used) is kept out of training; the published metadata reports the MAE of the piece cost (per
MiB), its median and mean relative error, the median absolute error of the log cost, and the same for
the naive predictor (the training median), so "the model pays" can be read off the file. Schedulers
refuse a model whose median relative error is above their ``--model-max-error`` or whose median absolute
log error is not at least 20 % below the naive one (its advantage is not proven), and use the log error
to judge, per decision, whether the model separates the candidates at all.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from remora.errors import InvalidInput
from remora.plugins.scheduler.history import read_rows
from remora.plugins.scheduler.learned import (
    LOAD,
    MIB,
    MODEL_FORMAT,
    SHARED_TARGET,
    TARGET,
    CostModel,
    publish_model,
)
from remora.plugins.scheduler.selection import FEATURE_NAMES


@dataclass
class TrainConfig:
    max_rows: int = 2_000_000
    min_rows: int = 200
    holdout: float = 0.2
    max_iter: int = 100
    max_depth: int = 8
    max_leaf_nodes: int = 31
    learning_rate: float = 0.1
    seed: int = 0
    keep: int = 5
    threads: int = 0          # OpenMP threads for the fit; 0 = every core (see benchmarks/bench_trainer.py)
    unshared: bool = True     # target: cost with the parent serving only this piece (see the module doc)
    drop: tuple = ()          # FEATURE_NAMES left out (blanked) of the fit: the ablation


def load_history(history_dir: str, max_rows: int, unshared: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X [rows, features] with NaN for unknown, log cost per MiB, time) of the newest ``max_rows`` rows;
    ``unshared``: raw costs divided by the parent's transfers + 1 (at choice time), see the module doc."""
    feats, ys, ts = [], [], []
    nan = math.nan
    for row in read_rows(history_dir, max_rows):
        try:
            cost, size, t = float(row["cost_s"]), int(row["size"]), float(row["t"])
            f = [nan if v is None else float(v) for v in row["f"]]
        except (KeyError, TypeError, ValueError):
            continue
        if not (cost > 0 and size > 0 and math.isfinite(cost)):
            continue
        share = 1.0
        if unshared and row.get("norm", True) is False:
            load = f[LOAD]
            share = 1.0 + (load if load == load and load > 0 else 0.0)     # NaN-safe
        feats.append(f)
        ys.append(math.log(cost * MIB / size / share))
        ts.append(t)
    X = np.array(feats, dtype=np.float64).reshape(-1, len(FEATURE_NAMES))
    X[~np.isfinite(X)] = np.nan
    return X, np.array(ys), np.array(ts)


def export_trees(model) -> tuple[float, list[dict]]:
    """The fitted regressor as plain arrays (baseline, trees) for :class:`CostModel`."""
    trees = []
    for (pred,) in model._predictors:       # one predictor per iteration for a regressor
        n = pred.nodes
        if np.any(n["is_categorical"]):
            raise InvalidInput("categorical splits are not supported by the scheduler's evaluator")
        # A split of "missing or not" has threshold +inf; JSON has no inf, and no finite feature exceeds this.
        thr = np.nan_to_num(n["num_threshold"].astype(float), posinf=1.7e308, neginf=-1.7e308)
        trees.append({"feature": n["feature_idx"].tolist(), "threshold": np.where(n["is_leaf"], 0.0, thr).tolist(),
                      "missing_left": n["missing_go_to_left"].astype(int).tolist(),
                      "left": n["left"].tolist(), "right": n["right"].tolist(),
                      "value": n["value"].tolist(), "leaf": n["is_leaf"].astype(int).tolist()})
    baseline = float(np.ravel(model._baseline_prediction)[0])
    return baseline, trees


def errors(pred_log: np.ndarray, true_log: np.ndarray) -> dict:
    pred, true = np.exp(pred_log), np.exp(true_log)
    rel = np.abs(pred - true) / true
    return {"rows": len(true), "mae_s_per_mib": float(np.mean(np.abs(pred - true))),
            "median_rel_error": float(np.median(rel)), "mean_rel_error": float(np.mean(rel)),
            "median_abs_log_error": float(np.median(np.abs(pred_log - true_log)))}


def train(history_dir: str, config: TrainConfig | None = None) -> tuple[dict, CostModel]:
    """Fit and validate; returns (the model document to publish, the model as the scheduler reads it)."""
    from sklearn import __version__ as sklearn_version
    from sklearn.ensemble import HistGradientBoostingRegressor

    config = config or TrainConfig()
    if not 0 < config.holdout < 1:
        raise InvalidInput("holdout must be between 0 and 1")
    t0 = time.perf_counter()
    unknown = set(config.drop) - set(FEATURE_NAMES)
    if unknown:
        raise InvalidInput(f"cannot drop unknown features {sorted(unknown)}")
    X, y, t = load_history(history_dir, config.max_rows, config.unshared)
    for name in config.drop:
        X[:, FEATURE_NAMES.index(name)] = np.nan
    if len(y) < config.min_rows:
        raise InvalidInput(f"{history_dir}: {len(y)} usable history rows, at least {config.min_rows} needed")
    order = np.argsort(t, kind="stable")
    X, y = X[order], y[order]
    cut = int(len(y) * (1 - config.holdout))
    load_s = time.perf_counter() - t0
    reg = HistGradientBoostingRegressor(max_iter=config.max_iter, max_depth=config.max_depth,
                                        max_leaf_nodes=config.max_leaf_nodes, learning_rate=config.learning_rate,
                                        early_stopping=False, random_state=config.seed)
    train_X = X[:cut]
    empty = np.all(np.isnan(train_X), axis=0)
    if empty.any():   # a feature never known in this history: constant (scikit-learn fails on all-NaN)
        train_X = train_X.copy()
        train_X[:, empty] = 0.0
    from threadpoolctl import threadpool_limits

    # On a machine busy with other work, OpenMP threads that wait for each other at every barrier can
    # make the fit 10x slower than one thread: --threads 1 there.
    with threadpool_limits(limits=config.threads or os.cpu_count() or 1):
        reg.fit(train_X, y[:cut])
    fit_s = time.perf_counter() - t0 - load_s
    baseline, trees = export_trees(reg)
    doc = {"format": MODEL_FORMAT, "version": 0, "created": time.time(), "features": list(FEATURE_NAMES),
           "target": TARGET if config.unshared else SHARED_TARGET, "training_rows": int(cut), "baseline": baseline,
           "trees": trees,
           "trainer": {"library": f"scikit-learn {sklearn_version}", "estimator": "HistGradientBoostingRegressor",
                       "max_iter": config.max_iter, "max_depth": config.max_depth,
                       "max_leaf_nodes": config.max_leaf_nodes, "learning_rate": config.learning_rate,
                       "threads": config.threads or os.cpu_count() or 1, "dropped": list(config.drop),
                       "load_s": round(load_s, 3), "fit_s": round(fit_s, 3), "history_rows": len(y)}}
    model = CostModel.from_doc(dict(doc, validation={"median_rel_error": math.inf}), "(trained)")
    held_X, held_y = X[cut:], y[cut:]
    doc["validation"] = dict(errors(model.predict_log(held_X), held_y),
                             naive=errors(np.full(len(held_y), float(np.median(y[:cut]))), held_y))
    model.meta["validation"] = doc["validation"]
    return doc, model


def train_and_publish(history_dir: str, model_dir: str, config: TrainConfig | None = None) -> tuple[str, dict]:
    config = config or TrainConfig()
    doc, _ = train(history_dir, config)
    path = publish_model(model_dir, doc, keep=config.keep)
    doc["version"] = int(os.path.basename(path)[len("model-"):-len(".json")])
    return str(path), {k: v for k, v in doc.items() if k != "trees"}


def summary(meta: dict) -> str:
    v = meta["validation"]
    return json.dumps({"version": meta["version"], "training_rows": meta["training_rows"],
                       "validation": v, "trainer": meta["trainer"]}, indent=2)
