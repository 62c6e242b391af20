"""Shared benchmark harness: training-step throughput of a symbol, and JSON results.

``measure_train_throughput`` binds an ``mx.mod.Module`` on synthetic input, initialises it, and times
``forward_backward`` + ``update`` (SGD) steps after a warm-up; ``write_json`` stores a result with the
machine context (MXNet version, cores, load average) in ``benchmarks/results/<name>.json``.
"""
import json
import logging
import os
import platform
import time

import mxnet as mx
import numpy as np

from iterators.formats.atomic import atomic_write_text

logger = logging.getLogger(__name__)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _num_classes_from_symbol(symbol, data_shape):
    """C from the inferred shape of ``fc7_weight`` (None when the symbol has no classifier)."""
    if "fc7_weight" not in symbol.list_arguments():
        return None
    arg_shapes, _, _ = symbol.infer_shape_partial(data=data_shape)
    shape = dict(zip(symbol.list_arguments(), arg_shapes))["fc7_weight"]
    return int(shape[0]) if shape and shape[0] else None


def measure_train_throughput(symbol, data_shape, label_shape=None, contexts=None, steps=10, warmup=2,
                             num_classes=None, initializer=None, optimizer_params=None, seed=0):
    """Time training steps (forward + backward + SGD update) of ``symbol`` on synthetic data.

    Parameters
    ----------
    symbol : mx.sym.Symbol
        Training symbol with input ``data`` (and ``softmax_label`` if it takes a label).
    data_shape : tuple
        Global batch shape (B, 3, H, W); split evenly across ``contexts``.
    label_shape : tuple, optional
        Shape of ``softmax_label``; default (B,) when the symbol has that input.
    contexts : list of mx.Context, optional
        Default ``[mx.cpu()]``.
    steps, warmup : int
        Timed steps, and untimed steps run first (MKLDNN primitive creation, memory planning).
    num_classes : int, optional
        Labels are drawn from [0, num_classes); default: rows of ``fc7_weight``, else 1.
    initializer : mx.init.Initializer, optional
        Default ``Xavier(gaussian, out, 2)``.
    optimizer_params : dict, optional
        SGD parameters; default lr 0.01, momentum 0.9, wd 5e-4, rescale_grad 1/len(contexts).
    seed : int
        Seed of the synthetic data and the initialisation.

    Returns
    -------
    dict with ``samples_per_sec``, ``sec_per_step``, ``batch_size``, ``steps``, ``warmup``, ``contexts``,
    ``data_shape``, ``num_params``.
    """
    if steps < 1:
        raise ValueError(f"measure_train_throughput: steps={steps} must be >= 1")
    contexts = contexts or [mx.cpu()]
    batch_size = int(data_shape[0])
    has_label = "softmax_label" in symbol.list_arguments()
    label_names = ("softmax_label",) if has_label else None
    if num_classes is None:
        num_classes = _num_classes_from_symbol(symbol, data_shape) or 1
    rng = np.random.RandomState(seed)
    mx.random.seed(seed)
    data = mx.nd.array(rng.uniform(0, 255, size=data_shape).astype(np.float32))
    label_shape = label_shape or (batch_size,)
    labels = [mx.nd.array(rng.randint(0, num_classes, size=label_shape).astype(np.float32))] if has_label else None
    batch = mx.io.DataBatch(data=[data], label=labels)

    module = mx.mod.Module(symbol, data_names=("data",), label_names=label_names, context=contexts)
    module.bind(data_shapes=[("data", data_shape)],
                label_shapes=[("softmax_label", label_shape)] if has_label else None, for_training=True)
    module.init_params(initializer or mx.init.Xavier(rnd_type="gaussian", factor_type="out", magnitude=2))
    params = {"learning_rate": 0.01, "momentum": 0.9, "wd": 5e-4, "rescale_grad": 1.0 / len(contexts)}
    params.update(optimizer_params or {})
    module.init_optimizer(kvstore="device" if len(contexts) > 1 else "local", optimizer="sgd",
                          optimizer_params=params)

    def step():
        module.forward_backward(batch)
        module.update()

    for _ in range(warmup):
        step()
    mx.nd.waitall()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    for out in module.get_outputs():
        out.wait_to_read()
    mx.nd.waitall()
    elapsed = time.perf_counter() - start
    arg_params, _ = module.get_params()
    return {
        "samples_per_sec": batch_size * steps / elapsed,
        "sec_per_step": elapsed / steps,
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "contexts": [str(c) for c in contexts],
        "data_shape": list(data_shape),
        "num_params": int(sum(np.prod(v.shape) for v in arg_params.values())),
    }


def machine_info():
    """Context for a benchmark result: versions, cores, load average, relevant environment variables."""
    return {
        "mxnet": mx.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15": list(os.getloadavg()),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "mxnet_subgraph_backend": os.environ.get("MXNET_SUBGRAPH_BACKEND", "MKLDNN (default)"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(name, payload, results_dir=RESULTS_DIR):
    """Write ``payload`` plus ``machine_info()`` to ``<results_dir>/<name>.json`` atomically; return the path."""
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{name}.json")
    doc = {"name": name, "machine": machine_info(), **payload}
    atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=False) + "\n")
    logger.info("wrote %s", path)
    return path
