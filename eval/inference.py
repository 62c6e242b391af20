"""Embeddings from a bound MXNet Module: the one ``embed`` function, and checkpoint loading.

``embed`` is the forward loop of insightface's ``recognition/arcface_mxnet/verification.py`` ``test``
(windows of exactly ``batch_size`` rows, the last one overlapping the previous; ``outputs[0]`` is the
embedding; a training Module's label input is fed ones). ``eval.verification.test`` (CLI, train-time
verification, demo) embeds with it. ``load_embedding_module`` cuts a checkpoint at ``fc1_output`` and
binds it for inference, as upstream's ``main`` does. See docs/verification.md.
"""
import logging
import os
import time
from typing import NamedTuple

import mxnet as mx
import numpy as np

from eval.checkpoint_shapes import check_params
from eval.symbol_rewrite import inference_symbol

logger = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A checkpoint that cannot be used for verification (message names the file and the fix)."""


class Embeddings(NamedTuple):
    """What ``embed`` returns.

    embeddings : (n, D) array
        Raw module outputs (``flip=False``) or the sum of the outputs of each image and of its
        horizontal flip (``flip=True``). Not normalised (``test`` L2-normalises the flip sum).
    views : list of (n, D) arrays
        The raw outputs per view: ``[original]`` or ``[original, flipped]``.
    seconds : float
        Time spent in forward passes (upstream's "infer time").
    """
    embeddings: np.ndarray
    views: list
    seconds: float


def _forward(data, module, batch_size, label, data_extra):
    """Forward ``data`` (n, 3, H, W) in windows of exactly ``batch_size`` rows; return (n, D) and seconds.

    n >= batch_size: upstream's windows ``data[bb - batch_size: bb]`` (the last one overlaps the
    previous, keeping only its new rows). n < batch_size: one zero-padded batch, padded rows dropped
    (rows are independent at inference, BatchNorm uses its moving statistics).
    """
    if not isinstance(data, mx.nd.NDArray):
        data = mx.nd.array(data, dtype=np.float32)
    n = data.shape[0]
    embeddings = None
    seconds = 0.0
    if n < batch_size:
        padded = mx.nd.zeros((batch_size,) + tuple(data.shape[1:]), dtype=data.dtype)
        padded[:n] = data
        windows = [(padded, 0, n, n)]
    else:
        windows = []
        ba = 0
        while ba < n:
            bb = min(ba + batch_size, n)
            count = bb - ba
            windows.append((mx.nd.slice_axis(data, axis=0, begin=bb - batch_size, end=bb), ba, bb, count))
            ba = bb
    for window, ba, bb, count in windows:
        inputs = (window,) if data_extra is None else (window, mx.nd.array(data_extra))
        batch = mx.io.DataBatch(data=inputs, label=(label,))
        tic = time.perf_counter()
        module.forward(batch, is_train=False)
        out = module.get_outputs()[0].asnumpy()
        seconds += time.perf_counter() - tic
        if embeddings is None:
            embeddings = np.zeros((n, out.shape[1]), dtype=out.dtype)
        if n < batch_size:
            embeddings[:] = out[:n]
        else:
            embeddings[ba:bb, :] = out[batch_size - count:, :]
    return embeddings, seconds


def _mirror(data):
    """Horizontal flip of (n, 3, H, W) images (``mx.nd.flip(axis=3)``, as upstream's ``flip(axis=2)`` per CHW image)."""
    if isinstance(data, mx.nd.NDArray):
        return mx.nd.flip(data, axis=3)
    return np.ascontiguousarray(np.asarray(data)[:, :, :, ::-1])


def embed(images, module, batch_size, flip=False, flipped=None, data_extra=None, label_shape=None):
    """Embeddings of ``images`` with a bound Module: plain, or flip-summed as insightface's ``test``.

    Parameters
    ----------
    images : (n, 3, H, W) ``mx.nd.NDArray`` or numpy array
        RGB 0..255 (the network normalises), as ``load_bin`` returns them.
    module : mx.mod.Module
        Bound (for inference or training) with data ``(batch_size, 3, H, W)``; ``outputs[0]`` is the
        embedding. A label input (training Module) is fed ones, ``nd.ones(label_shape)`` if given.
        A training Module is used as is: the embeddings see its current weights.
    batch_size : int
        Rows per forward; fewer images than a batch are zero-padded.
    flip : bool
        False: the module's outputs. True: output(image) + output(horizontal flip of the image).
    flipped : (n, 3, H, W) array or None
        The flipped images when already at hand (``load_bin``'s ``data_list[1]``); else computed.
    data_extra : array or None
        Second data input fed with every batch (upstream's ``data_extra``).

    Returns
    -------
    Embeddings
        ``(embeddings, views, seconds)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    label = mx.nd.ones(label_shape if label_shape is not None else (batch_size,))
    sources = [images]
    if flip:
        sources.append(flipped if flipped is not None else _mirror(images))
    views, seconds = [], 0.0
    for data in sources:
        out, spent = _forward(data, module, batch_size, label, data_extra)
        views.append(out)
        seconds += spent
    embeddings = views[0] + views[1] if flip else views[0]
    return Embeddings(embeddings, views, seconds)


def load_embedding_module(prefix, epoch, ctx, batch_size, image_size):
    """Module computing ``fc1_output`` of a checkpoint (embedding-only or full training symbol).

    Parameters
    ----------
    prefix, epoch : ``prefix-symbol.json`` + ``prefix-%04d.params`` (``mx.model.save_checkpoint``'s files)
    ctx : mx.Context or list of contexts
    batch_size : int, the bound data batch
    image_size : (H, W)

    Extra parameters (``fc7_weight``...) are ignored; a missing one raises ``ModelLoadError``;
    a missing file ``FileNotFoundError`` naming it.
    """
    for path in (f"{prefix}-symbol.json", "%s-%04d.params" % (prefix, epoch)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path} (--model prefix,epoch)")
    sym, arg_params, aux_params = mx.model.load_checkpoint(prefix, epoch)
    internals = sym.get_internals()
    if "fc1_output" not in internals.list_outputs():
        raise ModelLoadError(f"{prefix}-symbol.json has no 'fc1_output' node (outputs: {sym.list_outputs()}); "
                             "verification needs insightface's embedding layer named fc1")
    sym = inference_symbol(internals["fc1_output"])  # Flatten before FullyConnected (eval.symbol_rewrite)
    model = mx.mod.Module(symbol=sym, context=ctx, label_names=None)
    model.bind(data_shapes=[("data", (batch_size, 3) + tuple(image_size))], for_training=False)
    missing = [n for n in sym.list_arguments() if n != "data" and n not in arg_params]
    missing += [n for n in sym.list_auxiliary_states() if n not in aux_params]
    if missing:
        raise ModelLoadError("%s-%04d.params lacks %s needed by fc1_output" % (prefix, epoch, ", ".join(missing)))
    check_params(sym, arg_params, aux_params, {"data": (batch_size, 3) + tuple(image_size)},
                 what="%s-%04d.params" % (prefix, epoch))  # ParamMismatchError names the first misfit
    model.set_params(arg_params, aux_params, allow_extra=True)
    return model
