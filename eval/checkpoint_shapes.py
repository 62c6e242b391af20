"""Does a checkpoint's parameters fit a network? One check, with an error naming the first parameter that does not.

Used by ``eval.inference.load_embedding_module`` (``eval.verification --model``), by the ONNX exporter
(``eval.export_onnx``) and by ``--pretrained`` (``recognition.checkpoints.load_pretrained``). Without it MXNet
reports a wrong checkpoint as a bare shape assertion from deep inside ``Module.init_params`` (or, worse, with
``allow_missing`` silently re-initialises parameters whose names differ). insightface's checkpoints
(``mx.model.save_checkpoint``: ``arg:``/``aux:`` keys, embedding symbol ending at ``fc1_output``) and this
project's share parameter names, so the check is by name and shape.
"""
import logging

logger = logging.getLogger(__name__)


class ParamMismatchError(ValueError):
    """A checkpoint parameter does not fit the network: ``name``, ``expected`` and ``found`` shapes (found is
    None when the parameter is missing)."""

    def __init__(self, message, name=None, expected=None, found=None):
        super().__init__(message)
        self.name, self.expected, self.found = name, expected, found


def _shape(value):
    return tuple(int(d) for d in value.shape)


def expected_shapes(symbol, input_shapes):
    """``(arg shapes, aux shapes)`` dicts of ``symbol`` given its input shapes (``{'data': (B, 3, H, W)}``)."""
    arg_shapes, _, aux_shapes = symbol.infer_shape_partial(**input_shapes)
    args = {n: tuple(s) for n, s in zip(symbol.list_arguments(), arg_shapes or []) if s is not None}
    auxs = {n: tuple(s) for n, s in zip(symbol.list_auxiliary_states(), aux_shapes or []) if s is not None}
    return args, auxs


def check_params(symbol, arg_params, aux_params, input_shapes, allow_missing=True, what="checkpoint",
                 network=None):
    """Check ``arg_params``/``aux_params`` against ``symbol``; return the names of missing parameters.

    Parameters
    ----------
    symbol : mx.sym.Symbol, the network the parameters are meant for
    arg_params, aux_params : dicts name -> NDArray (no ``arg:``/``aux:`` prefix)
    input_shapes : dict input name -> shape (every input not listed is treated as unknown)
    allow_missing : bool
        False: a parameter of ``symbol`` absent from the checkpoint raises. True: missing ones are returned.
    what : str, names the checkpoint in messages (e.g. ``prefix,epoch``)
    network : str or None, names the network in messages

    Raises
    ------
    ParamMismatchError
        On the first parameter (in the symbol's order) whose shape differs from the network's, or -- with
        ``allow_missing=False`` -- that is missing; also when the checkpoint holds none of the network's
        parameters (a checkpoint of another network whose names all differ).
    """
    inputs = set(input_shapes)
    args, auxs = expected_shapes(symbol, input_shapes)
    target = f"network {network!r}" if network else "the network"
    missing, present = [], 0
    for kind, names, params, shapes in (("argument", symbol.list_arguments(), arg_params, args),
                                        ("auxiliary state", symbol.list_auxiliary_states(), aux_params, auxs)):
        for name in names:
            if name in inputs or name.endswith("_label"):
                continue
            expected = shapes.get(name)
            if name not in params:
                if not allow_missing:
                    raise ParamMismatchError(
                        f"{what} does not fit {target}: {kind} {name!r} (expected shape {expected}) is not in the "
                        "checkpoint", name, expected, None)
                missing.append(name)
                continue
            present += 1
            found = _shape(params[name])
            if expected is not None and found != expected:
                raise ParamMismatchError(
                    f"{what} does not fit {target}: {kind} {name!r} has shape {found} in the checkpoint, the network "
                    f"expects {expected} (first mismatching parameter; check --network, --emb-size, net_multiplier, "
                    "--version-output/-unit/-se and the image size)", name, expected, found)
    if present == 0 and missing:
        raise ParamMismatchError(
            f"{what} does not fit {target}: none of its parameters is in the checkpoint (first expected: "
            f"{missing[0]!r} of shape {args.get(missing[0], auxs.get(missing[0]))}); is it a checkpoint of another "
            "network?", missing[0], args.get(missing[0], auxs.get(missing[0])), None)
    return missing
