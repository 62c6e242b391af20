"""MXNet parameter files (``prefix-%04d.params``) as ``mx.model.save_checkpoint`` writes them.

An ``mx.nd.save`` dict whose keys are ``arg:<name>`` (arguments: weights, biases, BatchNorm gamma/beta, PReLU
slopes) and ``aux:<name>`` (auxiliary states: BatchNorm moving mean/var). insightface's checkpoints and this
project's use the same layout.
"""
import os


def read_params(path):
    """Read a params file -> ``(arg_params, aux_params)`` dicts of NDArrays.

    Raises FileNotFoundError naming the path, or ValueError naming the first key that is neither ``arg:`` nor
    ``aux:`` (a file that is not an MXNet checkpoint).
    """
    import mxnet as mx
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"params file not found: {path}")
    arg_params, aux_params = {}, {}
    for key, value in mx.nd.load(path).items():
        kind, _, name = key.partition(":")
        if kind == "arg":
            arg_params[name] = value
        elif kind == "aux":
            aux_params[name] = value
        else:
            raise ValueError(f"{path}: key {key!r} is not 'arg:<name>' or 'aux:<name>' (not an MXNet checkpoint "
                             "written by mx.model.save_checkpoint)")
    return arg_params, aux_params
