"""One rank of tests/test_model_parallel.py's Horovod check (run by ``horovodrun -np 2 --gloo``).

Every rank holds ``ctx`` CPU contexts and their fc7 shards; the global batch (same seed on every rank) is split
rank-major. Rank 0 writes the gathered parameters after the steps to ``<out>/rank_params.npz``.
"""
import os
import sys

import mxnet as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from recognition import distributed  # noqa: E402
from recognition.model_parallel import ModelParallelModule  # noqa: E402
from test_model_parallel import SIDE, batch_of, head_config, start_params, toy_symbol  # noqa: E402


def main(out, loss, num_classes, contexts_per_rank, steps):
    dist = distributed.init("horovod")
    cfg = head_config(loss, num_classes, per_batch_size=4, verbose=1000, max_steps=steps)
    sym = toy_symbol(cfg)
    contexts = [mx.cpu(i) for i in range(contexts_per_rank)]
    local = cfg.per_batch_size * contexts_per_rank
    module = ModelParallelModule(sym, contexts, cfg)
    module.bind([("data", (local, 3, SIDE, SIDE))], [("softmax_label", (local,))])
    args, aux = start_params(cfg)
    module.init_params(None, arg_params=args, aux_params=aux)
    sgd = mx.optimizer.SGD(learning_rate=0.1, momentum=0.9, wd=5e-4,
                           rescale_grad=1.0 / (contexts_per_rank * dist.size))
    module.init_optimizer(kvstore="device", optimizer=dist.wrap_optimizer(sgd))
    ce = []
    for step in range(steps):
        batch = batch_of(local * dist.size, num_classes, seed=100 + step)
        rows = slice(dist.rank * local, (dist.rank + 1) * local)
        mine = mx.io.DataBatch([batch.data[0][rows]], [batch.label[0][rows]])
        module.forward_backward(mine)
        module.update()
        ce.append(float(module._step["ce"].sum()))
    module._gather_for_save()  # collective: every rank
    arg_params, _ = module.get_params()
    if dist.rank == 0:
        np.savez(os.path.join(out, "rank_params.npz"), ce=np.array(ce),
                 **{k: v.asnumpy() for k, v in arg_params.items()})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
