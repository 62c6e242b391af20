"""Model-parallel classifier: ``fc7`` split by class over the devices, softmax normalised across the shards.

insightface's recipe for 85k-2M identities (``recognition/arcface_mxnet/train_parall.py`` +
``recognition/arcface_mxnet/parall_module_local_v1.py``; sampled variant: ``recognition/partial_fc/mxnet/
memory_module.py``), re-implemented for the engine's Module interface:

* the backbone (``data -> fc1``) stays data parallel: an ``mx.mod.Module`` on every context, ``kvstore`` as
  configured;
* the classifier rows are split evenly by class: with C classes and G shards, shard i owns classes
  ``[i*C//G, (i+1)*C//G)`` (sizes differ by at most one; unlike upstream's ``ceil(C/G)`` rows per GPU there are
  no padding classes, which would add their ``exp`` to the softmax denominator);
* every shard sees the whole global batch: the embeddings of all devices are gathered (B, D) and copied to the
  shard's context; the shard computes the registered head's logits (:data:`symbols.registry.HEADS`: softmax
  with or without bias, nsoftmax, arcface, arcface_v1, cosface, sphereface, combined) on its rows with the
  label shifted by the shard start (labels of other shards give an all-zero one-hot: no margin there);
* softmax across shards: global row max, global row sum of ``exp(z - max)``, ``p = exp(z - max) / sum``; the
  logits gradient is ``p - onehot`` divided by the valid-label count of the row's device slice, exactly what
  ``SoftmaxOutput(normalization='valid')`` gives per device in the single-device symbol; the optimizer's
  ``rescale_grad = 1/G`` then turns it into the global-batch mean as in the plain data-parallel Module;
* the embedding gradient is summed over the shards and handed back to the backbone, whose Module sends each
  device its slice;
* ``fc7`` is updated with the engine's SGD settings (lr schedule, momentum, wd, rescale, lr/wd mults when the
  engine honours them) on the shard's own context;
* the metrics get, per device slice, ``[embedding, predicted class, ce]`` where the prediction is the global
  argmax over all shards and ``ce = sum(-log softmax_y) / per_batch_size`` is computed from the global max and
  sum (``log`` of the global softmax, finite), so ``AccMetric`` and ``LossValueMetric`` read exactly what they
  read from the single-device symbol.

Checkpoints: :meth:`ModelParallelModule.get_params` gathers the shards into the single-device names
(``fc7_weight`` (C, D), ``fc7_bias``), so a saved checkpoint equals a single-device one and loading one
(resume, ``--pretrained``) splits it again. The optimizer-state file holds the backbone's states, the gathered
fc7 momentum and the Partial FC sampler's random state.

Partial FC (``sample_rate < 1``, :mod:`recognition.partial_fc`): each shard keeps its full class-centre bank
and momentum, and per step trains only the sampled rows (every positive class of the global batch plus
uniform negatives up to ``int(sample_rate * rows)``).
"""
import logging
import os
import tempfile
from collections import OrderedDict

import mxnet as mx
import numpy as np

from recognition.partial_fc import ClassSampler

logger = logging.getLogger(__name__)

EMBEDDING_OUTPUT = "fc1_output"
LABEL_NAME = "softmax_label"
FC7_INIT_SIGMA = 0.01  # HEAD fc7_weight init Normal(0.01) (symbols.losses.FC7_INIT_SIGMA)
STATES_FORMAT = "model_parallel_fc7/1"


def class_bounds(num_classes, num_shards):
    """Start of every shard plus the end: shard i owns ``[b[i], b[i+1])`` with ``b[i] = i*C//G``."""
    if num_shards < 1:
        raise ValueError(f"model parallel: {num_shards} shard(s)")
    if num_classes < num_shards:
        raise ValueError(f"model parallel: {num_classes} classes cannot be split over {num_shards} shards")
    return [i * num_classes // num_shards for i in range(num_shards + 1)]


def shard_logits_symbol(cfg, num_rows):
    """Logits ``fc7`` (B, num_rows) of the configured head on one shard: inputs ``data`` (B, D) embedding,
    ``softmax_label`` (B,) label relative to the shard (outside ``[0, num_rows)``: no margin), ``fc7_weight``
    (num_rows, D) (+ ``fc7_bias`` for the softmax head with bias). Built by the registered head's own builder."""
    from symbols.losses import fc7_weight_variable
    from symbols.registry import HEADS
    entry = HEADS.lookup(cfg.loss)
    if entry.is_triplet:
        raise ValueError(f"model parallel fc7 needs a softmax-family head, not {cfg.loss!r}")
    weight = fc7_weight_variable(num_rows, int(cfg.emb_size), float(cfg.fc7_lr_mult), float(cfg.fc7_wd_mult))
    return entry.logits(mx.sym.Variable("data"), mx.sym.Variable(LABEL_NAME), num_rows, weight,
                        s=float(cfg.loss_s), m1=float(cfg.loss_m1), m2=float(cfg.loss_m2), m3=float(cfg.loss_m3),
                        easy_margin=int(cfg.easy_margin), fc7_no_bias=bool(cfg.fc7_no_bias), dtype="float32")


def backbone_symbol(symbol):
    """``[fc1_output, BlockGrad(softmax_label)]`` cut from the full training symbol (insightface
    ``train_parall.get_symbol_embedding``): the data-parallel part."""
    internals = symbol.get_internals()
    if EMBEDDING_OUTPUT not in internals.list_outputs():
        raise ValueError("model parallel fc7 needs an 'fc1_output' node (the embedding) in the training symbol")
    return mx.sym.Group([internals[EMBEDDING_OUTPUT], mx.sym.BlockGrad(mx.sym.Variable(LABEL_NAME))])


class ClassShard:
    """Classes ``[start, stop)`` of fc7 on one context: parameters, momentum, executor(s), sampler.

    Model parallel (``sample_rate == 1``): the executor's argument arrays are the parameters. Partial FC: the
    full rows live in ``params`` (the "memory bank" of insightface's ``partial_fc/mxnet/memory_bank.py``); each
    step the sampled rows are gathered into the executor, trained, and written back with their momentum.
    """

    def __init__(self, cfg, index, start, stop, ctx, batch_size, sample_rate=1.0, rng=None, always_sample=False):
        self.cfg, self.index, self.start, self.stop, self.ctx = cfg, index, start, stop, ctx
        self.num_classes = stop - start
        self.batch_size = batch_size
        self.emb_size = int(cfg.emb_size)
        self.sampled = sample_rate < 1.0 or always_sample
        self.sampler = ClassSampler(self.num_classes, sample_rate, rng) if self.sampled else None
        self._executors = {}
        exe = self._executor(self.sampler.num_sample if self.sampled else self.num_classes)
        self.param_names = [n for n in exe.arg_dict if n not in ("data", LABEL_NAME)]
        if self.sampled:
            self.params = OrderedDict((n, mx.nd.zeros((self.num_classes,) + exe.arg_dict[n].shape[1:], ctx=ctx))
                                      for n in self.param_names)
        else:
            self.params = OrderedDict((n, exe.arg_dict[n]) for n in self.param_names)
        self.states = None      # momentum per parameter (full rows), created by init_states
        self.exe = None         # executor of the current step
        self.sample_index = None  # sorted local rows of the current step (Partial FC), numpy
        self._sample_nd = None

    # ---------------------------------------------------------------- executors
    def _executor(self, rows):
        exe = self._executors.get(rows)
        if exe is None:
            sym = shard_logits_symbol(self.cfg, rows)
            grad_req = {n: ("null" if n == LABEL_NAME else "write") for n in sym.list_arguments()}
            exe = sym.simple_bind(self.ctx, grad_req=grad_req, data=(self.batch_size, self.emb_size),
                                  softmax_label=(self.batch_size,))
            self._executors[rows] = exe
            self.attrs = sym.attr_dict()
        return exe

    def nbytes(self):
        """Bytes of this shard's fc7 rows (parameters) and of their momentum."""
        params = sum(int(np.prod(a.shape)) * 4 for a in self.params.values())
        states = sum(int(np.prod(a.shape)) * 4 for a in (self.states or {}).values())
        return {"params": params, "momentum": states}

    # ---------------------------------------------------------------- parameters
    def init_params(self, initializer, full_params=None):
        """Rows ``[start, stop)`` of ``full_params[name]`` when given, else the variable's init attribute
        (``fc7_weight``: Normal(0.01)) / ``initializer`` (bias: zeros)."""
        for name, arr in self.params.items():
            if full_params is not None and name in full_params:
                src = full_params[name]
                if src.shape[0] < self.stop:
                    raise ValueError(f"{name} has {src.shape[0]} rows; shard {self.index} needs rows "
                                     f"[{self.start}, {self.stop})")
                arr[:] = src[self.start:self.stop].as_in_context(self.ctx)
            else:
                init = initializer if initializer is not None else mx.init.Normal(FC7_INIT_SIGMA)
                init(mx.init.InitDesc(name, self.attrs.get(name)), arr)

    def init_states(self, momentum):
        self.states = (OrderedDict((n, mx.nd.zeros(a.shape, ctx=self.ctx)) for n, a in self.params.items())
                       if momentum > 0 else OrderedDict())

    # ---------------------------------------------------------------- step
    def forward(self, embedding, labels):
        """Logits of the global batch on this shard. ``embedding`` (B, D) NDArray, ``labels`` (B,) numpy
        global class ids. Returns ``(logits, onehot)`` on this shard's context (one-hot rows of samples whose
        class is not on this shard, or not sampled, are zero: no margin, no target).

        Partial FC: a step with more positives than ``num_sample`` binds (once) an executor for that many rows."""
        local = labels - self.start
        if self.sampled:
            inside = (local >= 0) & (local < self.num_classes)
            self.sample_index = self.sampler.sample(np.unique(local[inside]).astype(np.int64))
            exe = self._executor(len(self.sample_index))
            self._sample_nd = mx.nd.array(self.sample_index, ctx=self.ctx, dtype="int64")
            for name in self.param_names:
                mx.nd.take(self.params[name], self._sample_nd, out=exe.arg_dict[name])
            pos = np.searchsorted(self.sample_index, np.where(inside, local, 0))
            local = np.where(inside, pos, -1)
        else:
            exe = self._executors[self.num_classes]
        self.exe = exe
        embedding.copyto(exe.arg_dict["data"])
        label = mx.nd.array(local.astype(np.float32), ctx=self.ctx)
        if LABEL_NAME in exe.arg_dict:  # the plain softmax head has no label input
            label.copyto(exe.arg_dict[LABEL_NAME])
        exe.forward(is_train=True)
        logits = exe.outputs[0]
        onehot = mx.nd.one_hot(label, depth=logits.shape[1])
        return logits, onehot

    def rows_to_classes(self, rows):
        """Global class ids of logits columns ``rows`` (numpy)."""
        if self.sampled:
            return self.sample_index[rows] + self.start
        return rows + self.start

    def backward(self, logits_grad):
        """Gradients of the rows and of the embedding; returns the embedding gradient (B, D)."""
        self.exe.backward(out_grads=[logits_grad])
        return self.exe.grad_dict["data"]

    def update(self, hyper):
        """One SGD step of the trained rows; ``hyper(name) -> dict(lr, wd, momentum, rescale_grad[,
        clip_gradient])``. Partial FC writes the sampled rows and their momentum back (others untouched)."""
        exe = self.exe
        for name in self.param_names:
            kw = hyper(name)
            momentum = kw.pop("momentum")
            if self.sampled:
                # the sampled rows' gradient as a row_sparse array: MXNet's lazy SGD updates exactly those rows of
                # the full bank and momentum in place (bitwise what gather/update/scatter gives, 2-3x faster)
                weight = self.params[name]
                grad = mx.nd.sparse.row_sparse_array((exe.grad_dict[name], self._sample_nd), shape=weight.shape,
                                                     ctx=self.ctx)
                kw["lazy_update"] = True
            else:
                weight, grad = exe.arg_dict[name], exe.grad_dict[name]
            if momentum > 0:
                mx.nd.sgd_mom_update(weight, grad, self.states[name], out=weight, momentum=momentum, **kw)
            else:
                mx.nd.sgd_update(weight, grad, out=weight, **kw)


class ModelParallelModule(mx.module.BaseModule):
    """The engine's Module for ``model_parallel`` / ``sample_rate < 1`` (see the module docstring).

    Parameters
    ----------
    symbol : the full single-device training symbol (``symbols.get_symbol(cfg)``); only its ``fc1_output``
        part is bound (data parallel); it names the checkpoint parameters.
    contexts : list of mx.Context; one fc7 shard per context.
    cfg : the run config (head, margins, ``emb_size``, ``num_classes``, ``per_batch_size``, ``sample_rate``,
        ``seed``).
    always_sample : run the Partial FC path (gather/scatter of the sampled rows) even at ``sample_rate`` 1.
    """

    def __init__(self, symbol, contexts, cfg, logger=logging, always_sample=False):
        super().__init__(logger=logger)
        self._symbol = symbol
        self._contexts = list(contexts)
        self._cfg = cfg
        self._backbone = mx.mod.Module(backbone_symbol(symbol), data_names=("data",), label_names=(LABEL_NAME,),
                                       context=self._contexts, logger=logger)
        from recognition import distributed
        self._dist = distributed.current()  # ranks (Horovod / ps-lite); size 1 in one process
        self._rank, self._ranks = self._dist.rank, self._dist.size
        # shard k = rank * G + i lives on context i of that rank
        self._bounds = class_bounds(int(cfg.num_classes), len(self._contexts) * self._ranks)
        self._cache = None      # multi-rank: fc7 (and momentum) gathered at the last save point
        self._version = 0       # fc7 updates so far (the cache is fresh when it has this version)
        self._tmp_dir = None
        self._sample_rate = float(cfg.get("sample_rate", 1.0))
        if not 0.0 < self._sample_rate <= 1.0:
            raise ValueError(f"sample_rate={self._sample_rate} must be in (0, 1]")
        self.shards = []
        self._optimizer = None
        self._step = None
        self._full_names = [n for n in symbol.list_arguments() if n.startswith("fc7")]
        self._always_sample = bool(always_sample)  # the Partial FC path even at sample_rate 1 (tests: equal)

    # ---------------------------------------------------------------- BaseModule properties
    @property
    def data_names(self):
        return ("data",)

    @property
    def output_names(self):
        return self._backbone.output_names

    @property
    def data_shapes(self):
        return self._backbone.data_shapes

    @property
    def label_shapes(self):
        return self._backbone.label_shapes

    @property
    def output_shapes(self):
        return self._backbone.output_shapes

    @property
    def symbol(self):
        return self._symbol

    @property
    def class_bounds(self):
        return list(self._bounds)

    # the backbone's executors for recognition.distributed.Backend.average_aux (BatchNorm statistics)
    @property
    def _exec_group(self):
        return self._backbone._exec_group

    @property
    def _aux_names(self):
        return self._backbone._aux_names

    def fc7_nbytes(self):
        """Per shard ``{"params": bytes, "momentum": bytes}`` of the allocated fc7 arrays."""
        return [shard.nbytes() for shard in self.shards]

    # ---------------------------------------------------------------- bind / params
    def bind(self, data_shapes, label_shapes=None, for_training=True, inputs_need_grad=False, force_rebind=False,
             shared_module=None, grad_req="write"):
        if self.binded and not force_rebind:
            self.logger.warning("Already bound, ignoring bind()")
            return
        self._backbone.bind(data_shapes, label_shapes, for_training=for_training, inputs_need_grad=inputs_need_grad,
                            force_rebind=force_rebind)
        self.for_training = for_training
        self.binded = True
        batch_size = self._backbone.data_shapes[0].shape[0]
        self._per_device = [s.stop - s.start for s in self._backbone._exec_group.slices]
        seed = self._cfg.get("seed", -1)
        self.shards = []
        first = self._rank * len(self._contexts)
        for i, ctx in enumerate(self._contexts):
            k = first + i
            rng = np.random.RandomState(None if seed is None or seed < 0 else seed + 7919 * k)
            self.shards.append(ClassShard(self._cfg, k, self._bounds[k], self._bounds[k + 1], ctx,
                                          batch_size * self._ranks, self._sample_rate, rng, self._always_sample))
        logger.info("model parallel fc7: %d classes over %d shard(s) (%d here: %s)%s", self._bounds[-1],
                    len(self._bounds) - 1, len(self.shards), [s.num_classes for s in self.shards],
                    f", Partial FC sample_rate {self._sample_rate}" if self._sample_rate < 1 else "")

    def init_params(self, initializer=mx.init.Uniform(0.01), arg_params=None, aux_params=None, allow_missing=False,
                    force_init=False, allow_extra=False):
        assert self.binded, "call bind before initializing the parameters"
        if self.params_initialized and not force_init:
            return
        backbone_args = set(self._backbone._param_names)
        bb_args = None if arg_params is None else {k: v for k, v in arg_params.items() if k in backbone_args}
        if arg_params is not None and not allow_extra:
            extra = sorted(set(arg_params) - backbone_args - set(self._full_names))
            if extra:
                raise ValueError(f"parameters not in the model: {extra}")
        self._backbone.init_params(initializer=initializer, arg_params=bb_args, aux_params=aux_params,
                                   allow_missing=allow_missing, force_init=force_init, allow_extra=allow_extra)
        full = None
        if arg_params is not None:
            full = {k: v for k, v in arg_params.items() if k in self._full_names}
            missing = [n for n in self._full_names if n not in full]
            if missing and not allow_missing:
                raise ValueError(f"missing parameters: {missing}")
        for shard in self.shards:
            shard.init_params(initializer, full)
        self.params_initialized = True

    def get_params(self):
        """Backbone parameters + the gathered fc7 (single-device names and shapes), CPU arrays.

        With several ranks the gather is a collective: every rank calls it (``broadcast_params``), or the copy
        gathered by every rank at the last save point (:meth:`update`) is used when it is current.
        """
        arg_params, aux_params = self._backbone.get_params()
        arg_params = dict(arg_params)
        arg_params.update(self._fc7_full()[0])
        return arg_params, dict(aux_params)

    def _fc7_full(self, momentum=False):
        """``({name: full fc7}, {name: full momentum as numpy} or None)``."""
        if self._ranks > 1 and self._cache is not None:
            # after init_optimizer only rank 0 asks (checkpoints): never start a collective the others miss
            if self._cache["version"] != self._version:
                logger.warning("model parallel: the fc7 gathered at update %d is saved at update %d (a multi-rank "
                               "run gathers fc7 every `verbose` updates and at max_steps)", self._cache["version"],
                               self._version)
            return self._cache["params"], self._cache["momentum"]
        params = {name: self._gather(lambda s: s.params[name], f"mp.param.{name}")
                  for name in self.shards[0].param_names}
        mom = None
        if momentum and self.shards[0].states is not None:
            mom = {name: self._gather(lambda s: s.states[name], f"mp.mom.{name}").asnumpy()
                   for name in self.shards[0].states}
        return params, mom

    def _gather_for_save(self):
        """Collective (every rank, same update): cache the full fc7 and momentum for rank 0's checkpoint."""
        self._cache = None
        params, mom = self._fc7_full(momentum=True)
        self._cache = {"version": self._version, "params": params, "momentum": mom}

    def set_params(self, arg_params, aux_params, allow_missing=False, force_init=True, allow_extra=False):
        self.init_params(initializer=None, arg_params=arg_params, aux_params=aux_params, allow_missing=allow_missing,
                         force_init=force_init, allow_extra=allow_extra)

    def _gather(self, get, name):
        local = mx.nd.concat(*[get(s).as_in_context(mx.cpu()) for s in self.shards], dim=0)
        return self._dist.allgather(local, name=name) if self._ranks > 1 else local

    # ---------------------------------------------------------------- optimizer
    def init_optimizer(self, kvstore="local", optimizer="sgd", optimizer_params=(("learning_rate", 0.01),),
                       force_init=False):
        assert self.binded and self.params_initialized
        sgd = getattr(optimizer, "_optimizer", optimizer)  # inside Horovod's DistributedOptimizer
        if not isinstance(sgd, mx.optimizer.SGD):
            raise ValueError("model parallel fc7 is trained with the engine's SGD (an mx.optimizer.SGD instance)")
        self._backbone.init_optimizer(kvstore=kvstore, optimizer=optimizer, force_init=force_init)
        self._optimizer = optimizer  # what the backbone Module drives (the engine reads idx2name from it)
        self._sgd = sgd              # fc7 hyper-parameters (lr schedule, momentum, wd, rescale_grad)
        for shard in self.shards:
            shard.init_states(sgd.momentum)
        if self._ranks > 1:
            self._gather_for_save()
        self.optimizer_initialized = True

    def _hyper(self, name):
        opt = self._sgd
        kw = {"lr": opt.learning_rate * opt.lr_mult.get(name, 1.0), "wd": opt.wd * opt.wd_mult.get(name, 1.0),
              "momentum": opt.momentum, "rescale_grad": opt.rescale_grad}
        if opt.clip_gradient is not None:
            kw["clip_gradient"] = opt.clip_gradient
        return kw

    def _states_tree(self):
        """The backbone's updater states, the gathered fc7 momentum (single-device shapes) and the Partial FC
        samplers' random states, as a tree of arrays/numbers/strings."""
        from recognition import checkpoints as ckpts
        fd, tmp = tempfile.mkstemp(prefix=".backbone-", dir=self._tmp_dir)
        os.close(fd)
        try:
            ckpts.save_optimizer_states(self._backbone, tmp)
            backbone = ckpts.read_state_tree(tmp)
        finally:
            os.remove(tmp)
        samplers = {}
        for shard in self.shards:
            if shard.sampled:  # ('MT19937', uint32 keys, pos, has_gauss, cached); MXNet has no uint32 arrays
                kind, keys, pos, has_gauss, cached = shard.sampler.rng.get_state()
                samplers[str(shard.index)] = [kind, keys.astype(np.int64), int(pos), int(has_gauss), float(cached)]
        return {"format": STATES_FORMAT, "backbone": backbone,
                "fc7_momentum": self._fc7_full(momentum=True)[1] or {}, "samplers": samplers}

    def save_optimizer_states(self, fname):
        """:meth:`_states_tree` through :func:`recognition.checkpoints.write_state_tree` (one NDArray file, no
        pickle)."""
        from recognition import checkpoints as ckpts
        self._tmp_dir = os.path.dirname(os.path.abspath(fname))
        ckpts.write_state_tree(fname, self._states_tree())

    def load_optimizer_states(self, fname):
        from recognition import checkpoints as ckpts
        tree = ckpts.read_state_tree(fname)
        if not isinstance(tree, dict) or tree.get("format") != STATES_FORMAT:
            raise ValueError(f"{fname}: not a model-parallel optimizer state (was the run trained without "
                             "--model-parallel?)")
        fd, tmp = tempfile.mkstemp(prefix=".backbone-", dir=os.path.dirname(os.path.abspath(fname)))
        os.close(fd)
        try:
            ckpts.write_state_tree(tmp, tree["backbone"])
            ckpts.load_optimizer_states(self._backbone, tmp)
        finally:
            os.remove(tmp)
        for shard in self.shards:
            for name in shard.states:
                full = tree["fc7_momentum"].get(name)
                if full is not None:
                    shard.states[name][:] = mx.nd.array(np.asarray(full)[shard.start:shard.stop], ctx=shard.ctx)
            state = tree["samplers"].get(str(shard.index))
            if shard.sampled and state is not None:
                kind, keys, pos, has_gauss, cached = state
                shard.sampler.rng.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss),
                                             float(cached)))

    # ---------------------------------------------------------------- computation
    def forward(self, data_batch, is_train=None):
        """Backbone forward; when training, also the logits of every shard and the cross-shard softmax.

        With several ranks the embeddings and labels of every rank are all-gathered first (rank order), so every
        shard sees the global batch (insightface ``partial_fc/mxnet/memory_module.py``'s ``allgather``).
        """
        assert self.binded and self.params_initialized
        if is_train is None:
            is_train = self.for_training
        self._backbone.forward(data_batch, is_train=is_train)
        self._step = None
        if not is_train:
            return
        embedding = self._backbone.get_outputs(merge_multi_context=True)[0]
        label = data_batch.label[0].astype("float32").reshape((-1,))
        if self._ranks > 1:
            embedding = self._dist.allgather(embedding.as_in_context(mx.cpu()), name="mp.embedding")
            label = self._dist.allgather(label.as_in_context(mx.cpu()), name="mp.label")
        labels = label.asnumpy().astype(np.int64)
        self._step = self._softmax_across_shards(embedding, labels)

    def _rank_max(self, values, name):
        """Element-wise max over the ranks of (B,) ``values`` -> (max, rank holding it (first))."""
        if self._ranks == 1:
            return values, np.zeros(values.shape, dtype=np.int64)
        every = self._dist.allgather(mx.nd.array(values[None, :], ctx=mx.cpu()), name=name).asnumpy()
        return every.max(axis=0), every.argmax(axis=0)

    def _rank_sum(self, values, name):
        if self._ranks == 1:
            return values
        return self._dist.allreduce(values, name=name)

    def _softmax_across_shards(self, embedding, labels):
        """insightface ``ParallModule.backward`` / partial_fc ``backward``: global max, global sum, p."""
        red = self._contexts[0]
        logits, onehots = [], []
        for shard in self.shards:
            z, oh = shard.forward(embedding.as_in_context(shard.ctx), labels)
            logits.append(z)
            onehots.append(oh)
        row_max = [mx.nd.max(z, axis=1) for z in logits]
        row_arg = [mx.nd.argmax(z, axis=1) for z in logits]
        shard_max = np.stack([m.asnumpy() for m in row_max], axis=1)                  # (B, local shards)
        local_best = shard_max.argmax(axis=1)
        args = np.stack([a.asnumpy().astype(np.int64) for a in row_arg], axis=1)
        local_pred = np.empty(labels.shape, dtype=np.int64)
        for i, shard in enumerate(self.shards):
            rows = local_best == i
            local_pred[rows] = shard.rows_to_classes(args[rows, i])
        global_max, best_rank = self._rank_max(shard_max.max(axis=1), "mp.max")
        pred = local_pred
        if self._ranks > 1:  # the argmax of the rank holding the global max (first rank on ties)
            every = self._dist.allgather(mx.nd.array(local_pred[None, :].astype(np.float64), ctx=mx.cpu(),
                                                     dtype="float64"), name="mp.pred").asnumpy()
            pred = every[best_rank, np.arange(len(labels))].astype(np.int64)
        global_max_nd = mx.nd.array(global_max, ctx=red)
        exps, sums, target = [], [], []
        for shard, z, oh in zip(self.shards, logits, onehots):
            e = mx.nd.exp(mx.nd.broadcast_sub(z, global_max_nd.as_in_context(shard.ctx).expand_dims(1)))
            exps.append(e)
            sums.append(mx.nd.sum(e, axis=1).as_in_context(red))
            target.append(mx.nd.sum(z * oh, axis=1).as_in_context(red))
        local_sum = mx.nd.add_n(*sums) if len(sums) > 1 else sums[0]
        local_target = mx.nd.add_n(*target) if len(target) > 1 else target[0]
        global_sum = self._rank_sum(local_sum, "mp.sum")
        target_logit = self._rank_sum(local_target, "mp.target")
        has_target = (labels >= 0) & (labels < self._bounds[-1])
        ce = (global_max_nd + mx.nd.log(global_sum) - target_logit).asnumpy() * has_target
        return {"labels": labels, "exps": exps, "onehots": onehots, "global_sum": global_sum, "ce": ce,
                "pred": pred}

    def backward(self, out_grads=None):
        """Logits gradient ``(p - onehot) / valid`` per shard, embedding gradient summed over the shards (and
        ranks); this rank's rows go back to its backbone."""
        assert self.binded and self.params_initialized and self._step is not None
        step = self._step
        labels = step["labels"]
        scale = np.empty(labels.shape, dtype=np.float32)
        start = 0
        for n in self._per_device * self._ranks:  # SoftmaxOutput normalization='valid' on every device slice
            valid = int((labels[start:start + n] != -1).sum())
            scale[start:start + n] = 1.0 / max(valid, 1)
            start += n
        red = self._contexts[0]
        emb_grad = None
        for shard, e, oh in zip(self.shards, step["exps"], step["onehots"]):
            p = mx.nd.broadcast_div(e, step["global_sum"].as_in_context(shard.ctx).expand_dims(1))
            grad = mx.nd.broadcast_mul(p - oh, mx.nd.array(scale, ctx=shard.ctx).expand_dims(1))
            g = shard.backward(grad).as_in_context(red)
            emb_grad = g if emb_grad is None else emb_grad + g
        if self._ranks > 1:
            local = sum(self._per_device)
            emb_grad = self._rank_sum(emb_grad.as_in_context(mx.cpu()), "mp.embedding_grad")
            emb_grad = emb_grad[self._rank * local:(self._rank + 1) * local].as_in_context(red)
        self._backbone.backward(out_grads=[emb_grad])

    def update(self):
        """Backbone update (its optimizer/kvstore), then every local fc7 shard with the same SGD settings.

        Multi-rank: every ``verbose`` updates and at ``max_steps`` all ranks gather fc7 (and its momentum) for
        rank 0's checkpoints, which only rank 0 writes."""
        assert self.optimizer_initialized
        self._backbone.update()
        for shard in self.shards:
            shard.update(self._hyper)
        self._version += 1
        if self._ranks > 1:
            step = self._sgd.num_update
            if step % int(self._cfg.verbose) == 0 or step == int(self._cfg.get("max_steps", 0)):
                self._gather_for_save()

    def get_outputs(self, merge_multi_context=True):
        return self._backbone.get_outputs(merge_multi_context=merge_multi_context)

    def get_input_grads(self, merge_multi_context=True):
        return self._backbone.get_input_grads(merge_multi_context=merge_multi_context)

    def update_metric(self, eval_metric, labels, pre_sliced=False):
        """Per device slice (as ``Module.update_metric``): preds ``[embedding, predicted class, ce]`` with the
        prediction the global argmax and ``ce = sum(-log p_y) / per_batch_size`` from the global softmax."""
        step = self._step
        if step is None:
            raise RuntimeError("update_metric needs a training forward first")
        label = labels[0]
        embedding = self._backbone.get_outputs(merge_multi_context=True)[0]
        per_batch = float(self._cfg.per_batch_size)
        start = self._rank * sum(self._per_device)  # this rank's rows of the global batch (the engine sums ranks)
        offset = start
        out_names = self._backbone.output_names
        for n in self._per_device:
            sl = slice(start, start + n)
            preds = OrderedDict([(out_names[0], embedding[start - offset:start - offset + n]),
                                 ("softmax_output", mx.nd.array(step["pred"][sl])),
                                 ("ce_loss_output", mx.nd.array([step["ce"][sl].sum() / per_batch]))])
            eval_metric.update_dict(OrderedDict([(LABEL_NAME, label[start - offset:start - offset + n])]), preds)
            start += n

    def install_monitor(self, mon):
        self._backbone.install_monitor(mon)
