"""AccMetric / LossValueMetric vs hand-computed values (insightface recognition/arcface_mxnet/metric.py), incl. global vs local statistics."""
import mxnet as mx
import numpy as np
import pytest

import symbols
from metrics import AccMetric, LossValueMetric

EMB = mx.nd.zeros((3, 4))  # preds[0] (embedding) is not read


def probs(rows):
    return mx.nd.array(np.array(rows, dtype=np.float32))


def test_acc_metric_hand_computed_and_global_after_reset_local():
    metric = AccMetric()
    # device 1: argmax = [0, 2, 1] vs labels [0, 1, 1] -> 2 of 3
    metric.update([mx.nd.array([0, 1, 1])], [EMB, probs([[.7, .2, .1], [.1, .2, .7], [.3, .6, .1]])])
    # device 2: argmax = [2, 2] vs [2, 0] -> 1 of 2
    metric.update([mx.nd.array([2, 0])], [EMB, probs([[.1, .1, .8], [.2, .3, .5]])])
    assert metric.get() == ("acc", pytest.approx(3 / 5))
    assert metric.count == 2
    metric.reset_local()
    assert np.isnan(metric.get()[1])
    assert metric.get_global() == ("acc", pytest.approx(3 / 5))
    metric.update([mx.nd.array([1])], [EMB, probs([[.1, .8, .1]])])
    assert metric.get() == ("acc", 1.0)
    assert metric.get_global() == ("acc", pytest.approx(4 / 6))
    metric.reset()
    assert np.isnan(metric.get_global()[1])


def test_acc_metric_label_column_zero_and_preds_already_labels():
    metric = AccMetric()
    # 2-D label: column 0 is the class id (column 1 ignored)
    metric.update([mx.nd.array([[2, 0], [1, 1]])], [EMB, probs([[0, 0, 1], [1, 0, 0]])])
    assert metric.get()[1] == pytest.approx(0.5)
    metric.reset()
    # predictions with the label's shape are used as class ids directly
    metric.update([mx.nd.array([3, 1, 2])], [EMB, mx.nd.array([3, 0, 2])])
    assert metric.get()[1] == pytest.approx(2 / 3)


def test_acc_metric_errors():
    with pytest.raises(ValueError, match=r"preds\[1\]"):
        AccMetric().update([mx.nd.array([0])], [EMB])
    with pytest.raises(ValueError, match="labels for"):
        AccMetric().update([mx.nd.array([0, 1, 2])], [EMB, probs([[1, 0], [0, 1]])])


def test_loss_value_metric_mean_of_first_element():
    metric = LossValueMetric()
    metric.update([], [EMB, mx.nd.array([2.0])])
    metric.update([], [EMB, mx.nd.array([4.0, 100.0])])  # only element 0 counts
    assert metric.get() == ("lossvalue", pytest.approx(3.0))
    metric.reset_local()
    metric.update([], [mx.nd.array([9.0])])
    assert metric.get() == ("lossvalue", pytest.approx(9.0))
    assert metric.get_global() == ("lossvalue", pytest.approx(5.0))


def test_registered_with_mx_metric():
    assert isinstance(mx.metric.create("accmetric"), AccMetric)
    assert isinstance(mx.metric.create("face_acc"), AccMetric)
    assert isinstance(mx.metric.create("lossvalue"), LossValueMetric)
    composite = mx.metric.create([AccMetric(), LossValueMetric()])
    assert isinstance(composite, mx.metric.CompositeEvalMetric)


def test_module_update_metric_two_devices():
    """Module.update_metric calls update once per device slice with [emb, softmax, ce] outputs."""
    sym = symbols.get_symbol({"network": "r18", "net_multiplier": 0.125, "emb_size": 8, "num_classes": 3,
                              "per_batch_size": 2, "loss": "softmax"})
    mod = mx.mod.Module(sym, context=[mx.cpu(0), mx.cpu(1)])
    mod.bind(data_shapes=[("data", (4, 3, 32, 32))], label_shapes=[("softmax_label", (4,))], for_training=False)
    mod.init_params(symbols.get_initializer("r18"))
    labels = mx.nd.array([0, 1, 2, 1])
    batch = mx.io.DataBatch([mx.nd.random.uniform(0, 255, (4, 3, 32, 32))], [labels])
    mod.forward(batch, is_train=False)
    acc, loss = AccMetric(), LossValueMetric()
    mod.update_metric(acc, batch.label)
    mod.update_metric(loss, batch.label)
    outputs = mod.get_outputs(merge_multi_context=False)
    prob = np.concatenate([o.asnumpy() for o in outputs[1]])
    expected_acc = np.mean(prob.argmax(1) == labels.asnumpy())
    assert acc.count == 2 and acc.num_inst == 4
    assert acc.get()[1] == pytest.approx(expected_acc)
    ce = [o.asnumpy()[0] for o in outputs[2]]
    assert loss.num_inst == 2 and loss.get()[1] == pytest.approx(np.mean(ce), rel=1e-5)
    # ce_loss output = per-device mean cross entropy of the logits (-log p of the label)
    per_device = [-np.log(prob[i:i + 2][np.arange(2), labels.asnumpy()[i:i + 2].astype(int)]).mean()
                  for i in (0, 2)]
    np.testing.assert_allclose(ce, per_device, rtol=1e-4)
