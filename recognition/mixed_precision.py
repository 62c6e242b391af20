"""Opt-in float16 training (``--fp16`` / ``--fp16-scale``): float16 backbone, float32 master weights, loss scaling.

What insightface did: ``recognition/arcface_mxnet/train_parall.py`` ``--fp16-scale`` (> 0 turns on ``config.fp16``
and builds ``optimizer.SGD(..., multi_precision=True)``); HEAD ``symbol/fresnet.py`` with ``config.fp16`` casts the
normalised input to float16 and the body back to float32 before the embedding head; ``recognition/partial_fc/mxnet``
(``default.py`` ``config.fp16``) trains the backbone in float16 with a float32 classifier. Here:

* :func:`convert_symbol` rewrites a training symbol from ``symbols.get_symbol``: ``Cast(float16)`` right after
  the input normalisation ``(x - 127.5) * 0.0078125`` (exact in float16 for integer pixels), ``Cast(float32)``
  on the embedding (the op node ``fc1`` is renamed ``fc1_fp16`` and the cast takes the name ``fc1``, so
  ``fc1_output`` stays the float32 embedding and every parameter keeps its insightface name and shape); the
  margin head and its softmax stay float32. Convolution/FullyConnected weights of the body become float16 arrays
  (MXNet type inference); BatchNorm keeps float32 gamma/beta/statistics.
* the logits reach ``SoftmaxOutput`` through ``BlockGrad(z) + (z - BlockGrad(z)) * loss_scale``: the forward
  value is exactly ``z`` (``z - z = 0``), the backward multiplies every gradient by ``loss_scale`` (a fixed
  (1,) parameter, so it can change without rebinding and is saved/restored with the checkpoint), so float16
  activation gradients do not underflow;
* :class:`DynamicLossScaler` runs between ``forward_backward`` and ``update``: when a gradient is not finite the
  update is skipped (weights, momentum and the optimizer's update count untouched) and the scale halved; after
  ``window`` clean steps it doubles. It sets ``optimizer.rescale_grad = 1 / (devices * scale)``, so the SGD
  kernel (``mp_sgd_mom_update`` with ``multi_precision=True``: float32 master weights and momentum) unscales in
  float32.

MXNet 1.9 has no float16 GEMM on CPU ("FP16 gemm on cpu not implemented"), so float16 training needs GPU
contexts; bfloat16 gave no speed-up on this project's CPU (see benchmarks/results/mixed_precision.json) and is
not offered. ``dtype='float32'`` builds the same rewritten graph without the precision change (used by the tests
to prove the rewrite and the scaler exact).
"""
import json
import logging

import mxnet as mx
import numpy as np

logger = logging.getLogger(__name__)

LOSS_SCALE = "loss_scale"
#: insightface-style default initial scale when only --fp16 is given (2^16, the usual dynamic-scaling start).
DEFAULT_SCALE = 65536.0
MAX_SCALE = 2.0 ** 24
MIN_SCALE = 1.0
_NORMALISATION_OPS = ("_minus_scalar", "_mul_scalar", "_plus_scalar", "_div_scalar", "_rminus_scalar")


def _splice(graph, target, build):
    """Insert nodes after node ``target`` of a symbol JSON graph; ``build(nodes, entry)`` appends them (``entry``:
    target's output 0) and returns the entry that every other consumer of target's output 0 (and the heads) reads."""
    old = graph["nodes"]
    nodes, pos, replacement = [], {}, None

    def fix(e):
        if replacement is not None and e[0] == target and e[1] == 0:
            return list(replacement)
        return [pos[e[0]], e[1], e[2] if len(e) > 2 else 0]

    for i, node in enumerate(old):
        node = dict(node, inputs=[fix(e) for e in node.get("inputs", [])])
        pos[i] = len(nodes)
        nodes.append(node)
        if i == target:
            replacement = build(nodes, [pos[i], 0, 0])
    graph["nodes"] = nodes
    graph["heads"] = [fix(e) for e in graph["heads"]]
    graph["arg_nodes"] = [i for i, n in enumerate(nodes) if n["op"] == "null"]
    graph.pop("node_row_ptr", None)
    return graph


def _add(nodes, op, name, inputs, attrs=None):
    node = {"op": op, "name": name, "inputs": inputs}
    if attrs:
        node["attrs"] = attrs
    nodes.append(node)
    return [len(nodes) - 1, 0, 0]


def _index(graph, name, op=None):
    hits = [i for i, n in enumerate(graph["nodes"]) if n["name"] == name and (op is None or n["op"] == op)]
    if len(hits) != 1:
        raise ValueError(f"mixed precision: expected one node {name!r}, found {len(hits)}")
    return hits[0]


def convert_symbol(symbol, dtype="float16", loss_scale=DEFAULT_SCALE):
    """The training symbol with a ``dtype`` body and a loss-scaled softmax (see the module docstring).

    ``symbol`` must have input ``data``, the embedding node ``fc1`` and a ``SoftmaxOutput`` (softmax-family
    heads); a triplet head (``MakeLoss``) raises ``ValueError``. Argument and auxiliary names are unchanged plus
    ``loss_scale`` (shape (1,), initialised to ``loss_scale``; keep it out of the optimizer: ``fixed_param_names``).
    """
    graph = json.loads(symbol.tojson())
    names = [n["name"] for n in graph["nodes"]]
    if LOSS_SCALE in names:
        raise ValueError("mixed precision: the symbol is already converted (it has a loss_scale input)")
    if not any(n["op"] == "SoftmaxOutput" for n in graph["nodes"]):
        raise ValueError("mixed precision (--fp16) needs a softmax-family head (SoftmaxOutput); a triplet head has none")
    # 1. float16 from the end of the input normalisation chain on
    cur = _index(graph, "data", "null")
    while True:
        consumers = [i for i, n in enumerate(graph["nodes"]) if any(e[0] == cur for e in n.get("inputs", []))]
        if len(consumers) == 1 and graph["nodes"][consumers[0]]["op"] in _NORMALISATION_OPS:
            cur = consumers[0]
        else:
            break
    graph = _splice(graph, cur, lambda nodes, e: _add(nodes, "Cast", "data_" + dtype, [e], {"dtype": dtype}))
    # 2. back to float32 on the embedding: the cast takes fc1's name (fc1_output stays the embedding)
    fc1 = next(i for i, n in enumerate(graph["nodes"]) if n["name"] == "fc1" and n["op"] != "null")
    graph["nodes"][fc1]["name"] = "fc1_" + dtype
    graph = _splice(graph, fc1, lambda nodes, e: _add(nodes, "Cast", "fc1", [e], {"dtype": "float32"}))
    # 3. gradient multiplier in front of each SoftmaxOutput
    for name in [n["name"] for n in graph["nodes"] if n["op"] == "SoftmaxOutput"]:
        softmax = graph["nodes"][_index(graph, name, "SoftmaxOutput")]
        logits = softmax["inputs"][0][0]

        def scale(nodes, e, name=name):
            var = _add(nodes, "null", LOSS_SCALE, [], {"__shape__": "(1,)",
                                                          "__init__": mx.init.Constant(float(loss_scale)).dumps()})
            held = _add(nodes, "BlockGrad", name + "_scale_hold", [e])
            zero = _add(nodes, "elemwise_sub", name + "_scale_zero", [e, held])
            grad = _add(nodes, "broadcast_mul", name + "_scale_grad", [zero, var])
            return _add(nodes, "elemwise_add", name + "_scaled_input", [held, grad])

        graph = _splice(graph, logits, scale)
    return mx.sym.load_json(json.dumps(graph))


def set_loss_scale(module, value):
    """Write ``value`` into the ``loss_scale`` argument of every executor of a bound ``mx.mod.Module``."""
    for exe in module._exec_group.execs:
        exe.arg_dict[LOSS_SCALE][:] = float(value)


class DynamicLossScaler:
    """Dynamic loss scaling with overflow skip for an ``mx.mod.Module`` bound on a :func:`convert_symbol` graph.

    ``step(module, optimizer)`` after ``forward_backward``: returns True (call ``module.update()``) when every
    gradient is finite, else False (skip this update) and halves the scale; ``window`` clean steps in a row
    double it (bounded by ``MIN_SCALE``/``MAX_SCALE``). ``num_devices`` is the number of gradient copies summed
    per update (the plain ``rescale_grad`` is ``1 / num_devices``).
    """

    def __init__(self, scale=DEFAULT_SCALE, num_devices=1, window=2000):
        if not scale > 0:
            raise ValueError(f"DynamicLossScaler: scale must be > 0, got {scale}")
        self.scale, self.num_devices, self.window = float(scale), int(num_devices), int(window)
        self.clean_steps = 0
        self.skipped = 0
        self._applied = None

    def begin(self, module):
        """Adopt the scale the module holds (the initial constant, or a resumed checkpoint's value)."""
        stored = float(module._exec_group.execs[0].arg_dict[LOSS_SCALE].asnumpy()[0])
        if not (stored > 0 and np.isfinite(stored)):
            raise ValueError(f"fp16: the module's loss_scale is {stored}; expected a positive finite value")
        self.scale = self._applied = stored

    def grads_finite(self, module):
        """True when every gradient of every device is finite (one fused check per step)."""
        grads = [g for per_param in module._exec_group.grad_arrays for g in per_param if g is not None]
        if not grads:
            return True
        flag = mx.nd.multi_all_finite(*grads, num_arrays=len(grads), init_output=True)
        return bool(flag.asscalar() > 0)

    def step(self, module, optimizer):
        """After ``forward_backward``: True -> call ``module.update()`` (rescale_grad set for this step's scale);
        False -> skip it. A changed scale is written into the executors for the next forward."""
        if self._applied is None:
            self.begin(module)
        optimizer.rescale_grad = 1.0 / (self.num_devices * self._applied)  # the scale this backward used
        ok = self.grads_finite(module)
        if ok:
            self.clean_steps += 1
            if self.clean_steps >= self.window and self.scale < MAX_SCALE:
                self.scale, self.clean_steps = min(self.scale * 2.0, MAX_SCALE), 0
        else:
            self.skipped += 1
            self.clean_steps = 0
            new = max(self.scale / 2.0, MIN_SCALE)
            logger.warning("fp16: non-finite gradient at loss scale %g: update skipped (%d so far), scale -> %g",
                           self.scale, self.skipped, new)
            self.scale = new
        if self.scale != self._applied:
            set_loss_scale(module, self.scale)
            self._applied = self.scale
        return ok





#: The body precision of ``--fp16`` (the tests set "float32" to run the rewritten graph and the scaler on CPU).
FP16_DTYPE = "float16"


def convert_for_config(symbol, cfg, contexts):
    """The engine's ``--fp16`` step: check the run can use it and return :func:`convert_symbol` of ``symbol``."""
    if FP16_DTYPE == "float16" and any(c.device_type == "cpu" for c in contexts):
        raise ValueError("--fp16 needs GPU contexts: MXNet 1.9 has no float16 convolution/GEMM on CPU (\"FP16 gemm "
                         "on cpu not implemented\"); train in float32 on CPU")
    if cfg.get("model_parallel") or cfg.get("sample_rate", 1.0) < 1.0:
        raise ValueError("--fp16 is not supported with --model-parallel / --sample-rate (the sharded fc7 has its own "
                         "update path); use one of them")
    scale = float(cfg.get("fp16_scale") or 0) or DEFAULT_SCALE
    logger.info("fp16: %s body, float32 embedding/head and master weights, initial loss scale %g", FP16_DTYPE, scale)
    return convert_symbol(symbol, FP16_DTYPE, scale)
__all__ = ["convert_symbol", "convert_for_config", "set_loss_scale", "DynamicLossScaler", "DEFAULT_SCALE", "LOSS_SCALE"]
