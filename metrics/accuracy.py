"""insightface's ``AccMetric`` and ``LossValueMetric`` as ``mx.metric.EvalMetric`` subclasses
(insightface ``recognition/arcface_mxnet/metric.py``; OLD ``src/train_softmax.py`` L45-82, commit 9fc3cc9c).

Output-order contract (``symbols.get_symbol``): ``preds[0]`` = embedding, ``preds[1]`` = SoftmaxOutput
probabilities (B, C), ``preds[-1]`` = scalar loss (``ce_loss`` or the triplet ``MakeLoss``).
``Module.update_metric`` calls ``update`` once per device with that device's slices.

Both keep global statistics (``has_global_stats=True``): ``mx.callback.Speedometer(auto_reset=True)`` calls
``reset_local()`` after every print, while ``Module.fit``'s end-of-epoch ``Train-acc`` reads the global
figure, which therefore covers the whole epoch (upstream's metrics are local-only, so its epoch figure
covered only the batches since the last Speedometer print).
"""
import mxnet as mx
import numpy as np


@mx.metric.register
@mx.metric.alias("face_acc")
class AccMetric(mx.metric.EvalMetric):
    """Training accuracy of the classifier: argmax of ``preds[1]`` vs ``labels[0]``.

    .. math:: \\mathrm{acc} = \\frac{1}{N}\\sum_i [\\arg\\max_j p_{ij} = y_i]

    ``preds[1]`` (b, C) probabilities (taken as given if it already has the label's shape); ``labels[0]`` (b,)
    class ids, or (b, k) whose column 0 is the class id. Note that with a margin head the probabilities are
    those of the margin-penalised logits, so ArcFace's training accuracy is far below its true accuracy.
    """

    def __init__(self, name="acc", output_names=None, label_names=None):
        super().__init__(name, axis=1, output_names=output_names, label_names=label_names, has_global_stats=True)
        self.count = 0

    def update(self, labels, preds):
        """Add ``#(argmax(preds[1]) == labels[0])`` correct out of ``b`` samples."""
        self.count += 1
        if len(preds) < 2:
            raise ValueError(f"AccMetric reads preds[1] (softmax probabilities) but got {len(preds)} output(s); "
                             "use it with a softmax-family symbol (outputs [embedding, softmax, ...])")
        label = labels[0]
        pred = preds[1]
        if pred.shape != label.shape:
            pred = mx.nd.argmax(pred, axis=self._kwargs.get("axis", 1))
        pred = pred.asnumpy().astype(np.int32).reshape(-1)
        label = label.asnumpy()
        if label.ndim == 2:
            label = label[:, 0]
        label = label.astype(np.int32).reshape(-1)
        if label.shape != pred.shape:
            raise ValueError(f"AccMetric: {label.shape[0]} labels for {pred.shape[0]} predictions")
        correct = int((pred == label).sum())
        self.sum_metric += correct
        self.global_sum_metric += correct
        self.num_inst += len(pred)
        self.global_num_inst += len(pred)


@mx.metric.register
@mx.metric.alias("lossvalue")
class LossValueMetric(mx.metric.EvalMetric):
    """Running mean of the scalar loss output ``preds[-1]`` (first element per update).

    .. math:: \\mathrm{lossvalue} = \\frac{1}{U}\\sum_{u=1}^{U} \\mathrm{preds}^{(u)}[-1][0]

    where U counts updates (one per device per batch), as insightface.
    """

    def __init__(self, name="lossvalue", output_names=None, label_names=None):
        super().__init__(name, axis=1, output_names=output_names, label_names=label_names, has_global_stats=True)

    def update(self, labels, preds):
        """Add ``preds[-1][0]`` as one instance."""
        loss = float(preds[-1].asnumpy().reshape(-1)[0])
        self.sum_metric += loss
        self.global_sum_metric += loss
        self.num_inst += 1
        self.global_num_inst += 1
