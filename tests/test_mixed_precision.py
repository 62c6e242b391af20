"""--fp16 (recognition.mixed_precision): graph rewrite, dynamic loss scaling with overflow skip, float32 master weights.

MXNet 1.9 has no float16 GEMM/convolution on CPU, so the float16 numerics cannot run here. What is proven on CPU:
the rewritten graph (casts + loss-scale multiplier) and the scaler change nothing but the precision (run with
``FP16_DTYPE = 'float32'`` they train bitwise like the plain graph), overflowed steps are skipped and halve the
scale, the scale grows after a clean window, and multi_precision SGD keeps float32 master weights equal to a float32
run while the float16 copy is their rounding.
"""
import numpy as np
import mxnet as mx
import pytest

import symbols
from recognition import mixed_precision as mp
from recognition.checkpoints import load_resume_state
from recognition.config import load_config
from test_engine import make_data, run_tiny, tiny_symbol

B = 8


def test_convert_symbol_types_names_and_outputs():
    cfg = dict(network="y1", num_classes=20, emb_size=32, loss="arcface", per_batch_size=4, ce_loss=True)
    from symbols import ops
    previous = ops.set_enabled(False)  # the graph the engine builds for GPUs (the fused PReLU is CPU/float32 only)
    try:
        sym = symbols.get_symbol(cfg)
    finally:
        ops.set_enabled(previous)
    conv = mp.convert_symbol(sym, "float16", loss_scale=1024.0)
    assert conv.list_outputs() == sym.list_outputs()
    assert conv.list_arguments() == sym.list_arguments() + ["loss_scale"] or \
        sorted(conv.list_arguments()) == sorted(sym.list_arguments() + ["loss_scale"])
    assert conv.list_auxiliary_states() == sym.list_auxiliary_states()
    arg_types, out_types, aux_types = conv.infer_type(data="float32", softmax_label="float32")
    types = {k: np.dtype(t).name for k, t in zip(conv.list_arguments(), arg_types)}
    assert types["conv_1_conv2d_weight"] == "float16" and types["pre_fc1_weight"] == "float16"  # body
    assert types["fc7_weight"] == "float32" and types["loss_scale"] == "float32"  # head
    assert types["conv_1_batchnorm_gamma"] == "float32"  # BatchNorm keeps float32 parameters
    assert all(np.dtype(t).name == "float32" for t in out_types)
    emb = conv.get_internals()["fc1_output"]
    assert np.dtype(emb.infer_type(data="float32")[1][0]).name == "float32"  # the embedding stays float32
    arg_shapes, _, _ = conv.infer_shape(data=(4, 3, 112, 112), softmax_label=(4,))
    ref_shapes, _, _ = sym.infer_shape(data=(4, 3, 112, 112), softmax_label=(4,))
    shapes = dict(zip(conv.list_arguments(), arg_shapes))
    assert shapes.pop("loss_scale") == (1,)
    assert shapes == dict(zip(sym.list_arguments(), ref_shapes))
    with pytest.raises(ValueError, match="already converted"):
        mp.convert_symbol(conv)
    triplet = symbols.get_symbol(dict(network="y1", emb_size=32, loss="triplet", per_batch_size=6))
    with pytest.raises(ValueError, match="softmax-family"):
        mp.convert_symbol(triplet)


def test_forward_value_unchanged_by_the_loss_scale(tmp_path):
    """BlockGrad(z) + (z - BlockGrad(z)) * s is exactly z in the forward pass, for any s."""
    sym = tiny_symbol()
    x, y = make_data(n=B)
    outs = []
    for s in (None, 1.0, 65536.0, 3.0e38):
        net = sym if s is None else mp.convert_symbol(sym, "float32", loss_scale=s)
        mod = mx.mod.Module(net, context=mx.cpu(), fixed_param_names=["loss_scale"] if s else None)
        mod.bind(data_shapes=[("data", x.shape)], label_shapes=[("softmax_label", y.shape)])
        mx.random.seed(0)
        mod.init_params(mx.init.Xavier())
        mod.forward(mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)]), is_train=True)
        outs.append([o.asnumpy() for o in mod.get_outputs()])
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            np.testing.assert_array_equal(a, b)


def test_fp16_training_path_equals_float32_training(tmp_path, monkeypatch):
    """The engine's --fp16 path (rewritten graph, loss scale 2^16 in the backward, rescale_grad 1/2^16,
    multi_precision SGD, overflow check) with the body left in float32 trains bitwise like plain float32."""
    monkeypatch.setattr(mp, "FP16_DTYPE", "float32")
    x, y = make_data()
    plain = run_tiny(tmp_path / "plain", x, y, max_steps=6)
    scaled = run_tiny(tmp_path / "fp16", x, y, max_steps=6, fp16=True)
    _, w_plain, _, _ = load_resume_state(plain.run_dir)
    _, w_scaled, _, _ = load_resume_state(scaled.run_dir)
    assert float(w_scaled.pop("loss_scale").asnumpy()[0]) == mp.DEFAULT_SCALE  # saved with the checkpoint
    assert sorted(w_plain) == sorted(w_scaled)
    for name in w_plain:
        np.testing.assert_array_equal(w_plain[name].asnumpy(), w_scaled[name].asnumpy(), err_msg=name)


def _bound(scale, x_scale=1.0):
    x, y = make_data(n=B)
    x = x * np.float32(x_scale)
    mod = mx.mod.Module(mp.convert_symbol(tiny_symbol(), "float32", loss_scale=scale), context=mx.cpu(),
                        fixed_param_names=["loss_scale"])
    mod.bind(data_shapes=[("data", x.shape)], label_shapes=[("softmax_label", y.shape)])
    mx.random.seed(0)
    mod.init_params(mx.init.Xavier())
    opt = mx.optimizer.SGD(learning_rate=0.1, momentum=0.9, wd=5e-4, multi_precision=True)
    mod.init_optimizer(optimizer=opt)
    return mod, opt, mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)])


def test_overflow_skips_the_update_and_halves_the_scale_then_grows_after_a_clean_window():
    # inputs ~1e6: the fc7 weight gradient (p - y) x fc1 x scale overflows float32 at 2^127, not at 2^90
    mod, opt, batch = _bound(2.0 ** 127 * 1.5, x_scale=1e6)
    scaler = mp.DynamicLossScaler(num_devices=1, window=3)
    before = {k: v.asnumpy() for k, v in mod.get_params()[0].items()}
    mod.forward_backward(batch)
    assert not scaler.step(mod, opt)  # overflow: the engine does not call update()
    assert scaler.scale == 2.0 ** 126 * 1.5 and scaler.skipped == 1
    assert float(mod._exec_group.execs[0].arg_dict["loss_scale"].asnumpy()[0]) == np.float32(2.0 ** 126 * 1.5)
    for k, v in mod.get_params()[0].items():
        np.testing.assert_array_equal(v.asnumpy(), before[k])
    assert opt.num_update == 0
    updates = 0
    for _ in range(400):  # halves until the gradients fit, then updates
        used = scaler._applied  # the scale of this step's backward
        mod.forward_backward(batch)
        if scaler.step(mod, opt):
            assert opt.rescale_grad == 1.0 / used  # unscaled with the scale the gradients carry
            mod.update()
            updates += 1
            if updates == 3:
                break
        else:
            assert scaler.scale == max(used / 2, mp.MIN_SCALE)
    assert updates == 3 and scaler.skipped >= 2
    assert opt.num_update == 3  # skipped steps do not count as updates (lr schedule unaffected)
    assert not np.array_equal(mod.get_params()[0]["fc7_weight"].asnumpy(), before["fc7_weight"])
    assert all(np.isfinite(v.asnumpy()).all() for v in mod.get_params()[0].values())


def test_scale_doubles_after_a_clean_window():
    mod, opt, batch = _bound(1024.0)
    scaler = mp.DynamicLossScaler(num_devices=1, window=3)
    seen = []
    for _ in range(7):
        mod.forward_backward(batch)
        assert scaler.step(mod, opt)
        seen.append(opt.rescale_grad)
        mod.update()
    assert seen == [1 / 1024.0] * 3 + [1 / 2048.0] * 3 + [1 / 4096.0]
    assert scaler.scale == 4096.0 and float(mod._exec_group.execs[0].arg_dict["loss_scale"].asnumpy()[0]) == 4096.0


def test_scaled_update_equals_the_unscaled_one():
    """With a power-of-two scale, scaling the backward by s and rescale_grad by 1/s is exact."""
    results = []
    for scale in (1.0, 2.0 ** 20):
        mod, opt, batch = _bound(scale)
        scaler = mp.DynamicLossScaler(num_devices=1)
        for _ in range(4):
            mod.forward_backward(batch)
            assert scaler.step(mod, opt)
            mod.update()
        results.append({k: v.asnumpy() for k, v in mod.get_params()[0].items() if k != "loss_scale"})
    for k in results[0]:
        np.testing.assert_array_equal(results[0][k], results[1][k], err_msg=k)


def test_multi_precision_sgd_keeps_float32_master_weights():
    """insightface's multi_precision SGD: a float16 weight is updated through a float32 master copy (and float32
    momentum) exactly as a float32 weight would be; the float16 weight is the master rounded."""
    rng = np.random.RandomState(0)
    w0 = rng.randn(64).astype(np.float32)
    kw = dict(learning_rate=0.05, momentum=0.9, wd=5e-4, rescale_grad=1.0 / 1024)
    upd32 = mx.optimizer.get_updater(mx.optimizer.SGD(**kw))
    upd16 = mx.optimizer.get_updater(mx.optimizer.SGD(multi_precision=True, **kw))
    w32 = mx.nd.array(w0)
    w16 = mx.nd.array(w0.astype(np.float16), dtype="float16")
    w32[:] = w16.astype("float32")  # same start
    for step in range(50):
        g = (rng.randn(64) * 1024 * 1e-3).astype(np.float16)  # loss-scaled gradient, float16 as the body makes it
        upd32(0, mx.nd.array(g.astype(np.float32)), w32)
        upd16(0, mx.nd.array(g, dtype="float16"), w16)
    momentum, master = upd16.states[0]
    assert master.dtype == np.float32 and momentum.dtype == np.float32 and w16.dtype == np.float16
    np.testing.assert_array_equal(master.asnumpy(), w32.asnumpy())
    np.testing.assert_array_equal(w16.asnumpy(), w32.asnumpy().astype(np.float16))
    # without master weights, float16 updates drift: small steps are lost to rounding
    upd_plain = mx.optimizer.get_updater(mx.optimizer.SGD(**kw))
    w_plain = mx.nd.array(w0.astype(np.float16), dtype="float16")
    rng = np.random.RandomState(0)
    rng.randn(64)
    for step in range(50):
        g = (rng.randn(64) * 1024 * 1e-3).astype(np.float16)
        upd_plain(0, mx.nd.array(g, dtype="float16"), w_plain)
    assert np.abs(w_plain.asnumpy().astype(np.float32) - w32.asnumpy()).max() > \
        np.abs(w16.asnumpy().astype(np.float32) - w32.asnumpy()).max()


def test_config_and_cpu_guard(tmp_path):
    cfg = load_config(overrides=dict(fp16_scale=128.0))
    assert cfg.fp16  # --fp16-scale > 0 implies fp16, as insightface train_parall
    assert not load_config(overrides={}).fp16  # default unchanged
    for bad in (dict(fp16=True, loss="triplet", per_batch_size=6), dict(fp16=True, model_parallel=True),
                dict(fp16_scale=-1.0)):
        with pytest.raises(Exception, match="fp16"):
            load_config(overrides=bad)
    with pytest.raises(ValueError, match="needs GPU contexts"):
        run_tiny(tmp_path, fp16=True)
