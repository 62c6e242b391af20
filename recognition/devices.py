"""Device selection: ``--gpus 0,1``, ``--ctx cpu:N``, or insightface's ``CUDA_VISIBLE_DEVICES`` rule.

insightface reads ``os.environ['CUDA_VISIBLE_DEVICES']`` (KeyError when unset) and uses one GPU per listed id.
Here the rule is, in order: ``gpus`` -> those GPUs; ``ctx`` -> ``cpu`` or N CPU contexts (data parallel on one
machine, as MXNet's tests do); ``CUDA_VISIBLE_DEVICES`` non-empty and MXNet sees GPUs -> one GPU per listed id;
otherwise one CPU context.
"""
import logging
import os

import mxnet as mx

logger = logging.getLogger(__name__)


def get_contexts(gpus="", ctx="", environ=None, num_gpus=None):
    """Return the list of ``mx.Context`` to train on.

    Parameters
    ----------
    gpus : str, comma list of GPU ids ("" = not given)
    ctx : str, "cpu" or "cpu:N" ("" = not given)
    environ : mapping (default ``os.environ``), read for ``CUDA_VISIBLE_DEVICES``
    num_gpus : int or None, GPUs MXNet sees (default ``mx.context.num_gpus()``; injectable for tests)
    """
    environ = os.environ if environ is None else environ
    if gpus:
        ids = [int(i) for i in str(gpus).split(",") if i.strip()]
        available = mx.context.num_gpus() if num_gpus is None else num_gpus
        missing = [i for i in ids if i >= available]
        if missing:
            raise ValueError(f"--gpus {gpus}: GPU id(s) {missing} not available (MXNet sees {available} GPU(s)); "
                             "use --ctx cpu or --ctx cpu:N to train on CPU")
        contexts = [mx.gpu(i) for i in ids]
    elif ctx:
        _, _, count = ctx.partition(":")
        contexts = [mx.cpu(i) for i in range(int(count or 1))]
    else:
        visible = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
        available = 0
        if visible:
            available = mx.context.num_gpus() if num_gpus is None else num_gpus
        if visible and available > 0:
            contexts = [mx.gpu(i) for i in range(len([v for v in visible.split(",") if v.strip()]))]
        else:
            contexts = [mx.cpu()]
    if contexts[0].device_type == "gpu":
        logger.info("gpu num: %d", len(contexts))
    else:
        logger.info("use cpu (%d context%s)", len(contexts), "s" if len(contexts) > 1 else "")
    return contexts
