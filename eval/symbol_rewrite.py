"""Rewrites of a checkpoint's symbol JSON that keep its meaning at inference (pure JSON surgery).

No operator library and no other project package is needed, so symbols written by insightface (any MXNet 1.x
JSON dialect), by this project (fast PReLU graph) or with the optional ``fused_prelu`` operator
(``symbols/ops``) all work:

- :func:`rewrite_fused_prelu`: ``fused_prelu`` nodes -> ``LeakyReLU(act_type='prelu')`` on the same (data, gamma);
- :func:`rewrite_fast_prelu`: the subgraphs of ``symbols/common.py`` ``fast_prelu`` -- the 4-D form
  ``relu(x) + Deconvolution(relu(Deconvolution(x, -1)), Reshape(-gamma))`` (depthwise, kernel 1) and the
  rank-agnostic form of earlier checkpoints ``relu(x) + reshape_like(Flatten(Convolution(reshape(x - relu(x)),
  Reshape(gamma), num_group=C, kernel=(1,))), x)`` -- recognised by their structure (not by names) -> one
  ``LeakyReLU(prelu)`` named like the subgraph's output;
- :func:`remove_dropout_and_flatten_fc`: ``Dropout`` removed (identity at inference) and a ``Flatten`` put before
  every ``FullyConnected`` that flattens its input (MXNet does it implicitly);
- :func:`inference_symbol`: the ``Flatten`` insertion alone, for MXNet inference. MXNet 1.9.1's MKLDNN inference
  graph fails on the SECOND forward of a ``FullyConnected`` fed a 4-D MKLDNN tensor -- insightface's GDC head
  (``conv_6dw7_7`` -> BatchNorm -> ``pre_fc1``; y1, y2 and any ``--net-output GDC``) -- with "Check failed:
  !IsMKLDNNData(): We can't generate TBlob for MKLDNN data"; with the explicit Flatten it runs (same numbers,
  same parameters).
"""
import ast
import json
import logging

import mxnet as mx

logger = logging.getLogger(__name__)

FUSED_PRELU_OP = "fused_prelu"
_TRUE = ("true", "1")


class GraphRewriteError(ValueError):
    """The checkpoint's symbol cannot be turned into an exportable embedding graph (message names the node)."""


def _attrs(node):
    # MXNet >= 1.0 writes "attrs"; older files (insightface's published models) "attr" or "param".
    return node.get("attrs", node.get("attr", node.get("param", {}))) or {}


def _entry(e):
    return [e[0], e[1], e[2] if len(e) > 2 else 0]


def _nouts(doc):
    ptr = doc.get("node_row_ptr")
    if ptr and len(ptr) == len(doc["nodes"]) + 1:
        return [ptr[i + 1] - ptr[i] for i in range(len(doc["nodes"]))]
    return None


def rewrite_fused_prelu(doc):
    """In place: every ``fused_prelu`` node becomes ``LeakyReLU(act_type='prelu')`` (same inputs, same name)."""
    count = 0
    for node in doc["nodes"]:
        if node["op"] == FUSED_PRELU_OP:
            hidden = {k: v for k, v in _attrs(node).items() if k.startswith("__")}
            node.pop("attr", None)
            node.pop("param", None)
            node["op"] = "LeakyReLU"
            node["attrs"] = dict(hidden, act_type="prelu")
            node["inputs"] = [_entry(e) for e in node["inputs"][:2]]
            count += 1
    return count


def _only_used_inside(inner, head, consumers):
    allowed = set(inner) | {head}
    return all(c in allowed for j in inner for c in consumers.get(j, ()))


def _is_depthwise_unit_kernel(node, op):
    attrs = _attrs(node)
    return (node["op"] == op and len(node["inputs"]) == 2 and attrs.get("num_group") == attrs.get("num_filter")
            and ast.literal_eval(attrs.get("kernel", "()")) in ((1, 1), (1,), 1)
            and ast.literal_eval(attrs.get("stride", "(1, 1)")) in ((1, 1), (1,), 1)
            and ast.literal_eval(attrs.get("pad", "(0, 0)")) in ((0, 0), (0,), 0))


def _is_minus_one_constant(i, nodes):
    """Node i is ``Reshape(negative(ones_like(.)))`` (fast_prelu's -1 weight)."""
    shape = nodes[i]
    if shape["op"] != "Reshape":
        return False
    negated = nodes[shape["inputs"][0][0]]
    return negated["op"] == "negative" and nodes[negated["inputs"][0][0]]["op"] == "ones_like"


def _match_deconv_prelu(i, nodes, consumers):
    """(x, gamma) for ``relu(x) + dw(relu(dw(x, -1)), Reshape(negative(gamma)))``, dw a depthwise kernel-1
    Deconvolution (``symbols/common.py`` ``fast_prelu``, 4-D form)."""
    add = nodes[i]
    for pos_e, scaled_e in (add["inputs"], add["inputs"][::-1]):
        pos, scaled = nodes[pos_e[0]], nodes[scaled_e[0]]
        if pos["op"] != "Activation" or _attrs(pos).get("act_type") != "relu":
            continue
        if not _is_depthwise_unit_kernel(scaled, "Deconvolution"):
            continue
        x = _entry(pos["inputs"][0])
        neg_id, weight_id = scaled["inputs"][0][0], scaled["inputs"][1][0]
        neg, weight = nodes[neg_id], nodes[weight_id]
        if neg["op"] != "Activation" or _attrs(neg).get("act_type") != "relu" or weight["op"] != "Reshape":
            continue
        negate_id = neg["inputs"][0][0]
        negate = nodes[negate_id]
        if not _is_depthwise_unit_kernel(negate, "Deconvolution") or _entry(negate["inputs"][0]) != x:
            continue
        const_id = negate["inputs"][1][0]
        minus_gamma_id = weight["inputs"][0][0]
        minus_gamma = nodes[minus_gamma_id]
        if not _is_minus_one_constant(const_id, nodes) or minus_gamma["op"] != "negative":
            continue
        minus_one_id = nodes[const_id]["inputs"][0][0]
        ones_id = nodes[minus_one_id]["inputs"][0][0]
        inner = [pos_e[0], scaled_e[0], neg_id, negate_id, weight_id, minus_gamma_id, const_id, minus_one_id, ones_id]
        if not _only_used_inside(inner, i, consumers):
            continue
        return x, _entry(minus_gamma["inputs"][0])
    return None


def _match_fast_prelu(i, nodes, consumers):
    """(x entry, gamma entry) when node i is the output node of a fast_prelu subgraph, else None.

    Both forms of ``symbols/common.py``: the 4-D Deconvolution form and the rank-agnostic 1-D-conv form.
    """
    add = nodes[i]
    if add["op"] != "elemwise_add" or len(add["inputs"]) != 2:
        return None
    deconv = _match_deconv_prelu(i, nodes, consumers)
    if deconv is not None:
        return deconv
    for pos_e, scaled_e in (add["inputs"], add["inputs"][::-1]):
        pos, scaled = nodes[pos_e[0]], nodes[scaled_e[0]]
        if pos["op"] != "Activation" or _attrs(pos).get("act_type") != "relu":
            continue
        x = _entry(pos["inputs"][0])
        if scaled["op"] != "reshape_like" or _entry(scaled["inputs"][1]) != x:
            continue
        flat = nodes[scaled["inputs"][0][0]]
        if flat["op"] != "Flatten":
            continue
        conv = nodes[flat["inputs"][0][0]]
        cattrs = _attrs(conv)
        if conv["op"] != "Convolution" or len(conv["inputs"]) != 2:
            continue
        if ast.literal_eval(cattrs.get("kernel", "()")) not in ((1,), 1):
            continue
        if cattrs.get("num_group") != cattrs.get("num_filter"):
            continue
        reshaped, weight = nodes[conv["inputs"][0][0]], nodes[conv["inputs"][1][0]]
        if reshaped["op"] != "Reshape" or weight["op"] != "Reshape":
            continue
        neg = nodes[reshaped["inputs"][0][0]]
        if neg["op"] != "elemwise_sub" or [_entry(e) for e in neg["inputs"]] != [x, [pos_e[0], 0, 0]]:
            continue
        # the intermediate nodes must belong to this subgraph only
        inner = [pos_e[0], scaled_e[0], scaled["inputs"][0][0], flat["inputs"][0][0], conv["inputs"][0][0],
                 conv["inputs"][1][0], reshaped["inputs"][0][0]]
        if not _only_used_inside(inner, i, consumers):
            continue
        return x, _entry(weight["inputs"][0])
    return None


def _consumers(nodes):
    out = {}
    for i, node in enumerate(nodes):
        for e in node["inputs"]:
            out.setdefault(e[0], []).append(i)
    return out


class _Builder:
    """A new node list being built from an old one: ``emit`` appends, ``entry`` maps old entries to new ones."""

    def __init__(self, doc):
        self.old = doc["nodes"]
        self.old_nouts = _nouts(doc) or [1] * len(self.old)
        self.nodes, self.nouts, self.remap = [], [], {}

    def emit(self, node, nout=1):
        self.nodes.append(node)
        self.nouts.append(nout)
        return len(self.nodes) - 1

    def entry(self, e):
        target = self.remap[e[0]]
        if isinstance(target, list):  # the old node was replaced by an existing entry
            if e[1] != 0:
                raise GraphRewriteError(f"node {self.old[e[0]]['name']!r}: output {e[1]} used after a rewrite")
            return list(target)
        return [target, e[1], e[2] if len(e) > 2 else 0]


def _rebuild(doc, transform):
    """New document from ``transform(i, node, builder)`` per old node; keeps only nodes the heads reach.

    ``transform`` returns the new id of the node standing for the old one, an entry list (the old node is
    replaced by that entry), or None (the node is copied unchanged).
    """
    b = _Builder(doc)
    for i, node in enumerate(b.old):
        result = transform(i, node, b)
        if result is None:
            new = dict(node)
            new["inputs"] = [b.entry(e) for e in node["inputs"]]
            result = b.emit(new, b.old_nouts[i])
        b.remap[i] = result
    heads = [b.entry(h) for h in doc["heads"]]
    return _prune(b.nodes, b.nouts, heads, doc.get("attrs"))


def _prune(nodes, nouts, heads, attrs):
    keep, stack = set(), [h[0] for h in heads]
    while stack:
        i = stack.pop()
        if i not in keep:
            keep.add(i)
            stack.extend(e[0] for e in nodes[i]["inputs"])
    order = sorted(keep)
    new_id = {old: new for new, old in enumerate(order)}
    out, row_ptr = [], [0]
    for old in order:
        node = dict(nodes[old])
        node["inputs"] = [[new_id[e[0]], e[1], e[2] if len(e) > 2 else 0] for e in node["inputs"]]
        out.append(node)
        row_ptr.append(row_ptr[-1] + nouts[old])
    doc = {"nodes": out, "arg_nodes": [i for i, n in enumerate(out) if n["op"] == "null"], "node_row_ptr": row_ptr,
           "heads": [[new_id[h[0]], h[1], h[2] if len(h) > 2 else 0] for h in heads]}
    if attrs is not None:
        doc["attrs"] = attrs
    return doc


def rewrite_fast_prelu(doc):
    """fast_prelu subgraphs -> ``LeakyReLU(prelu)``; returns (new doc, count)."""
    nodes = doc["nodes"]
    consumers = _consumers(nodes)
    matches = {i: m for i in range(len(nodes)) for m in [_match_fast_prelu(i, nodes, consumers)] if m}

    def transform(i, node, b):
        if i not in matches:
            return None
        x, gamma = matches[i]
        hidden = {k: v for k, v in _attrs(node).items() if k.startswith("__")}
        return b.emit({"op": "LeakyReLU", "name": node["name"], "attrs": dict(hidden, act_type="prelu"),
                       "inputs": [b.entry(x), b.entry(gamma)]})

    return _rebuild(doc, transform), len(matches)


def remove_dropout_and_flatten_fc(doc, dropout=True):
    """Drop ``Dropout`` nodes (when ``dropout``); put a ``Flatten`` before each flattening ``FullyConnected``.

    Returns (doc, counts).
    """
    counts = {"dropout": 0, "flatten": 0}

    def transform(i, node, b):
        if dropout and node["op"] == "Dropout":
            counts["dropout"] += 1
            return b.entry(node["inputs"][0])
        if node["op"] == "FullyConnected" and str(_attrs(node).get("flatten", "True")).lower() in _TRUE:
            data = b.entry(node["inputs"][0])
            if b.nodes[data[0]]["op"] != "Flatten":
                data = [b.emit({"op": "Flatten", "name": node["name"] + "_flatten", "inputs": [data]}), 0, 0]
                counts["flatten"] += 1
            new = dict(node)
            new["inputs"] = [data] + [b.entry(e) for e in node["inputs"][1:]]
            return b.emit(new)
        return None

    return _rebuild(doc, transform), counts


def inference_symbol(sym):
    """``sym`` with a ``Flatten`` before each flattening ``FullyConnected`` (see the module docstring); ``sym``
    itself when there is nothing to insert."""
    doc, counts = remove_dropout_and_flatten_fc(json.loads(sym.tojson()), dropout=False)
    if not counts["flatten"]:
        return sym
    return mx.sym.load_json(json.dumps(doc))
