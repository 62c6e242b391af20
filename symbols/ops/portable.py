"""Symbol JSON surgery: checkpoints that never need the custom-operator library, and back.

A ``-symbol.json`` that names ``fused_prelu`` loads only in a process that has loaded the library
(``mx.sym.load`` fails with "Operator fused_prelu is not registered"): insightface users load checkpoints with
plain ``mx.model.load_checkpoint`` (deploy/face_model.py, recognition/eval/verification.py, ONNX export), so a
saved symbol must be portable. :func:`portable_json` rewrites every ``fused_prelu`` node, by editing the JSON
(no library needed, so it also repairs an already written file):

- ``mode='fast_prelu'`` (default): into the 4-D graph of :func:`symbols.common.fast_prelu` (relu + depthwise
  kernel-1 deconvolutions), the project's standard PReLU (every PReLU of the registered networks acts on a
  (B, C, H, W) tensor; a ``fused_prelu`` node without its ``ndim`` attribute gets the rank-agnostic form),
  whose gamma gradient is right (fine-tuning from the file trains correctly);
- ``mode='leakyrelu'``: into insightface's ``LeakyReLU(act_type='prelu')`` (one node, same two inputs), for tools
  that expect insightface's exact graph; its gamma gradient is wrong after a Convolution in MXNet 1.9.1, so
  prefer ``fast_prelu`` for anything that trains.

Either way the parameter stays ``<name>_gamma`` and the output ``<name>_output``, so the ``.params`` file and
``get_internals()['fc1_output']`` are unchanged. :func:`fuse_symbol` is the inverse: it turns ``fast_prelu``
subgraphs and ``LeakyReLU(prelu)`` nodes of a loaded symbol into ``fused_prelu`` nodes (needs the library).
"""
import ast
import json
import logging

import mxnet as mx

logger = logging.getLogger(__name__)

OP_NAME = "fused_prelu"
MODES = ("fast_prelu", "leakyrelu")
_DATA_VAR = "__fused_prelu_data__"
# Rank of a fused node's data, kept through a portable rewrite so that fuse_symbol restores the node exactly:
# the fused node's ``ndim`` attribute becomes this hidden attribute on the replacement's output node.
NDIM_HINT = "__prelu_ndim__"
_GAMMA_VAR = "__fused_prelu_gamma__"


def _to_doc(symbol_or_json):
    if isinstance(symbol_or_json, mx.sym.Symbol):
        return json.loads(symbol_or_json.tojson())
    if isinstance(symbol_or_json, dict):
        return json.loads(json.dumps(symbol_or_json))
    return json.loads(symbol_or_json)


def _num_outputs(doc):
    ptr = doc.get("node_row_ptr")
    if ptr and len(ptr) == len(doc["nodes"]) + 1:
        return [ptr[i + 1] - ptr[i] for i in range(len(doc["nodes"]))]
    return [1] * len(doc["nodes"])


def _finish(nodes, nouts, heads, attrs):
    """JSON document from a topologically ordered node list, keeping only the nodes the heads reach."""
    keep = set()
    stack = [h[0] for h in heads]
    while stack:
        i = stack.pop()
        if i in keep:
            continue
        keep.add(i)
        stack.extend(e[0] for e in nodes[i]["inputs"])
    order = sorted(keep)
    new_id = {old: new for new, old in enumerate(order)}
    out_nodes, row_ptr = [], [0]
    for old in order:
        node = dict(nodes[old])
        node["inputs"] = [[new_id[e[0]], e[1], e[2] if len(e) > 2 else 0] for e in node["inputs"]]
        out_nodes.append(node)
        row_ptr.append(row_ptr[-1] + nouts[old])
    doc = {"nodes": out_nodes, "arg_nodes": [i for i, n in enumerate(out_nodes) if n["op"] == "null"],
           "node_row_ptr": row_ptr,
           "heads": [[new_id[h[0]], h[1], h[2] if len(h) > 2 else 0] for h in heads]}
    if attrs is not None:
        doc["attrs"] = attrs
    return doc


def _hidden_attrs(node):
    return {k: v for k, v in node.get("attrs", {}).items() if k.startswith("__") and k.endswith("__")}


def _channels(node, nodes):
    """C of a fused_prelu node: its num_channels attribute, else the gamma variable's __shape__."""
    attrs = node.get("attrs", {})
    if "num_channels" in attrs:
        return int(attrs["num_channels"])
    gamma = nodes[node["inputs"][1][0]]
    shape = gamma.get("attrs", {}).get("__shape__")
    if gamma["op"] == "null" and shape:
        dims = ast.literal_eval(shape)
        if len(dims) == 1 and int(dims[0]) > 0:
            return int(dims[0])
    raise ValueError(f"{OP_NAME} node {node['name']!r}: channel count unknown (no num_channels attribute and no "
                     "__shape__ on its gamma); use mode='leakyrelu'")


def _ndim(node):
    """Rank of a fused node's data from its ``ndim`` attribute (:func:`symbols.ops.prelu_op`), else None."""
    value = node.get("attrs", {}).get("ndim")
    return int(value) if value not in (None, "", "None") else None


def _fast_prelu_template(name, num_channels, ndim):
    from ..common import fast_prelu  # local: symbols.common is the owner of the standard graph

    data = mx.sym.Variable(_DATA_VAR)
    gamma = mx.sym.Variable(_GAMMA_VAR)
    # rank unknown (ndim None): the rank-agnostic form, correct for any input
    doc = json.loads(fast_prelu(data, gamma, name, num_channels, ndim=ndim).tojson())
    for node in doc["nodes"]:  # auto-named nodes (fast_prelu's Flatten) get a deterministic name
        if node["op"] != "null" and not node["name"].startswith(name):
            node["name"] = f"{name}_{node['op'].lower()}"
    return doc["nodes"], _num_outputs(doc), doc["heads"][0]


def portable_json(symbol_or_json, mode="fast_prelu"):
    """JSON text of ``symbol_or_json`` (Symbol, JSON text or parsed dict) with no ``fused_prelu`` node left.

    See the module docstring for the two modes. Works without the operator library.
    """
    if mode not in MODES:
        raise ValueError(f"portable_json: mode={mode!r}; expected one of {MODES}")
    doc = _to_doc(symbol_or_json)
    nodes, nouts = doc["nodes"], _num_outputs(doc)
    out_nodes, out_nouts = [], []
    remap = {}  # old node id -> (new id, or the entry the old node's output 0 now is)

    def entry(e):
        target = remap[e[0]]
        if isinstance(target, list):  # a replaced single-output node: its new output entry
            return list(target)
        return [target, e[1], e[2] if len(e) > 2 else 0]

    for i, node in enumerate(nodes):
        if node["op"] != OP_NAME:
            new = dict(node)
            new["inputs"] = [entry(e) for e in node["inputs"]]
            remap[i] = len(out_nodes)
            out_nodes.append(new)
            out_nouts.append(nouts[i])
            continue
        data_e, gamma_e = entry(node["inputs"][0]), entry(node["inputs"][1])
        ndim = _ndim(node)
        hint = {NDIM_HINT: str(ndim)} if ndim is not None else {}
        if mode == "leakyrelu":
            new = {"op": "LeakyReLU", "name": node["name"], "inputs": [data_e, gamma_e],
                   "attrs": dict(_hidden_attrs(node), act_type="prelu", **hint)}
            remap[i] = len(out_nodes)
            out_nodes.append(new)
            out_nouts.append(1)
            continue
        tnodes, tnouts, thead = _fast_prelu_template(node["name"], _channels(node, nodes), ndim)
        tmap = {}
        for j, tnode in enumerate(tnodes):
            if tnode["op"] == "null" and tnode["name"] in (_DATA_VAR, _GAMMA_VAR):
                tmap[j] = data_e if tnode["name"] == _DATA_VAR else gamma_e
                continue
            new = dict(tnode)
            if _hidden_attrs(node):
                new["attrs"] = dict(tnode.get("attrs", {}), **_hidden_attrs(node))
            new["inputs"] = [list(tmap[e[0]]) if isinstance(tmap[e[0]], list) and tnodes[e[0]]["op"] == "null"
                             else [tmap[e[0]], e[1], e[2] if len(e) > 2 else 0] for e in tnode["inputs"]]
            if j == thead[0] and hint:
                new["attrs"] = dict(new.get("attrs", {}), **hint)
            tmap[j] = len(out_nodes)
            out_nodes.append(new)
            out_nouts.append(tnouts[j])
        remap[i] = [tmap[thead[0]], thead[1], 0]
    heads = [entry(h) for h in doc["heads"]]
    return json.dumps(_finish(out_nodes, out_nouts, heads, doc.get("attrs")), indent=2)


def portable_symbol(symbol, mode="fast_prelu"):
    """``symbol`` with every ``fused_prelu`` node rewritten (see :func:`portable_json`); loads without the library."""
    return mx.sym.load_json(portable_json(symbol, mode))


def uses_fused_op(symbol_or_json):
    """True when the symbol (or JSON) contains a ``fused_prelu`` node."""
    return any(n["op"] == OP_NAME for n in _to_doc(symbol_or_json)["nodes"])


def save_checkpoint(prefix, epoch, symbol, arg_params, aux_params, mode="fast_prelu", remove_amp_cast=True):
    """``mx.model.save_checkpoint`` with ``portable_symbol(symbol, mode)``: ``prefix-symbol.json`` needs no library."""
    mx.model.save_checkpoint(prefix, epoch, portable_symbol(symbol, mode), arg_params, aux_params,
                             remove_amp_cast=remove_amp_cast)


def _match_fast_prelu(i, nodes):
    """(data entry, gamma entry, C, ndim) if node i heads a fast_prelu subgraph (symbols/common.py), else None.

    Both forms are recognised: the 4-D one (``<name>_pos`` + Deconvolution ``<name>_scale`` of relu
    ``<name>_negpart`` of Deconvolution ``<name>_negate``) and the rank-agnostic one of earlier checkpoints
    (``<name>_scaled`` = reshape_like(Flatten(1-D Convolution ``<name>_scale``))).
    """
    node = nodes[i]
    name = node["name"]
    if node["op"] != "elemwise_add" or len(node["inputs"]) != 2:
        return None
    pos, scaled = (nodes[e[0]] for e in node["inputs"])
    if scaled["op"] == "Deconvolution":
        return _match_deconv_form(name, pos, scaled, nodes)
    if pos["op"] != "Activation" or pos["name"] != name + "_pos" or pos.get("attrs", {}).get("act_type") != "relu":
        return None
    if scaled["op"] != "reshape_like" or scaled["name"] != name + "_scaled":
        return None
    flat = nodes[scaled["inputs"][0][0]]
    conv = nodes[flat["inputs"][0][0]] if flat["op"] == "Flatten" else None
    if conv is None or conv["op"] != "Convolution" or conv["name"] != name + "_scale":
        return None
    weight = nodes[conv["inputs"][1][0]]
    if weight["op"] != "Reshape" or weight["name"] != name + "_weight":
        return None
    return pos["inputs"][0], weight["inputs"][0], int(conv["attrs"]["num_filter"]), None


def _match_deconv_form(name, pos, scaled, nodes):
    if scaled["op"] != "Deconvolution" or scaled["name"] != name + "_scale":
        return None
    if pos["op"] != "Activation" or pos["name"] != name + "_pos" or pos.get("attrs", {}).get("act_type") != "relu":
        return None
    data_e = pos["inputs"][0]
    neg = nodes[scaled["inputs"][0][0]]
    if neg["op"] != "Activation" or neg["name"] != name + "_negpart":
        return None
    negate = nodes[neg["inputs"][0][0]]
    if negate["op"] != "Deconvolution" or negate["name"] != name + "_negate" or negate["inputs"][0][:2] != data_e[:2]:
        return None
    weight = nodes[scaled["inputs"][1][0]]
    if weight["op"] != "Reshape" or weight["name"] != name + "_weight":
        return None
    minus_gamma = nodes[weight["inputs"][0][0]]
    if minus_gamma["op"] != "negative" or minus_gamma["name"] != name + "_minusgamma":
        return None
    return data_e, minus_gamma["inputs"][0], int(scaled["attrs"]["num_filter"]), 4


def fuse_symbol(symbol):
    """Inverse of :func:`portable_symbol`: ``fast_prelu`` subgraphs and ``LeakyReLU(prelu)`` nodes -> ``fused_prelu``.

    Use on a symbol loaded from a checkpoint (e.g. a ``--pretrained`` model to fine-tune) to train at the fused
    speed; parameters keep their names. Needs the library (``symbols.ops.load()``); RuntimeError otherwise.
    """
    if not hasattr(mx.sym, OP_NAME):
        raise RuntimeError(f"fuse_symbol: {OP_NAME} is not loaded (call symbols.ops.load() first)")
    doc = _to_doc(symbol)
    nodes, nouts = doc["nodes"], _num_outputs(doc)
    for i, node in enumerate(nodes):
        hidden = _hidden_attrs(node)
        hint = hidden.pop(NDIM_HINT, None)
        if node["op"] == "LeakyReLU" and node.get("attrs", {}).get("act_type") == "prelu" and len(node["inputs"]) == 2:
            new = {"op": OP_NAME, "name": node["name"], "inputs": node["inputs"], "attrs": dict(hidden)}
            gamma = nodes[node["inputs"][1][0]]
            shape = gamma.get("attrs", {}).get("__shape__")
            if shape:
                new["attrs"]["num_channels"] = str(int(ast.literal_eval(shape)[0]))
            if hint is not None:
                new["attrs"]["ndim"] = hint
            nodes[i], nouts[i] = new, 1
            continue
        match = _match_fast_prelu(i, nodes)
        if match is not None:
            data_e, gamma_e, channels, ndim = match
            attrs = dict(hidden, num_channels=str(channels))
            if hint is not None or ndim is not None:
                attrs["ndim"] = hint if hint is not None else str(ndim)
            nodes[i] = {"op": OP_NAME, "name": node["name"], "inputs": [data_e, gamma_e], "attrs": attrs}
            nouts[i] = 1
    return mx.sym.load_json(json.dumps(_finish(nodes, nouts, doc["heads"], doc.get("attrs"))))
