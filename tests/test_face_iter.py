"""FaceImageIter and augment: values against numpy/mxnet references, determinism, errors."""
import logging
import random

import cv2
import mxnet as mx
import numpy as np
import pytest

from iterators import augment
from iterators.face_iter import FaceImageIter
from iterators.formats.recordio import write_face_rec, write_property

S = 16  # tiny images keep the tests fast


def _png(rgb):
    ok, enc = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return enc.tobytes()


def _make_rec(path, counts=(3, 4, 2), size=(S, S), seed=0, corrupt=None, num_classes=None):
    """Write a rec of random RGB images (lossless PNG); returns (rec path, list of (label, rgb)) in record order."""
    rng = np.random.default_rng(seed)
    images = []
    for label, n in enumerate(counts):
        for _ in range(n):
            images.append((label, rng.integers(0, 256, size + (3,), dtype=np.uint8)))
    payloads = [_png(img) for _, img in images]
    if corrupt is not None:
        payloads[corrupt] = b"\xff\xd8 not really a jpeg"
    write_face_rec(path, [(lab, p) for (lab, _), p in zip(images, payloads)], image_size=size)
    if num_classes is not None:
        write_property(path, num_classes, *size)
    return str(path / "train.rec"), images


def _chw(img):
    return np.transpose(img, (2, 0, 1)).astype(np.float32)


def _epoch(it):
    out = []
    while True:
        try:
            b = it.next()
        except StopIteration:
            return out
        out.append((b.data[0].asnumpy(), b.label[0].asnumpy()))


def _match(sample, images):
    """Index of the reference image equal to ``sample`` (CHW float) or its mirror; returns (index, mirrored)."""
    for k, (_, img) in enumerate(images):
        if np.array_equal(sample, _chw(img)):
            return k, False
        if np.array_equal(sample, _chw(img[:, ::-1])):
            return k, True
    raise AssertionError("sample matches no reference image")


def test_sequential_order_values_shapes_and_dropped_last_batch(tmp_path):
    rec, images = _make_rec(tmp_path)
    it = FaceImageIter(4, (3, S, S), rec, num_workers=2)
    assert it.provide_data == [mx.io.DataDesc("data", (4, 3, S, S))]
    assert it.provide_label == [mx.io.DataDesc("softmax_label", (4,))]
    assert isinstance(it.provide_data[0], mx.io.DataDesc) and it.num_classes == 3
    for _ in range(2):  # two epochs: identical, 9 images -> 2 batches, the last image dropped
        batches = _epoch(it)
        assert len(batches) == 2 == it.num_batches
        for b, (data, label) in enumerate(batches):
            assert data.shape == (4, 3, S, S) and data.dtype == np.float32 and label.dtype == np.float32
            for i in range(4):
                lab, img = images[4 * b + i]
                np.testing.assert_array_equal(data[i], _chw(img))  # RGB, CHW, 0..255, no normalisation
                assert label[i] == lab
        it.reset()
    batch = FaceImageIter(4, (3, S, S), rec, num_workers=0).next()
    assert batch.pad == 0 and batch.data[0].context == mx.cpu()


def test_batches_outlive_the_iterator_and_feed_a_module(tmp_path):
    """Batch data is handed over zero-copy: it must stay valid and usable by Module after the iterator is gone."""
    import gc
    rec, images = _make_rec(tmp_path)
    it = FaceImageIter(4, (3, S, S), rec, num_workers=2)
    batches = [it.next(), it.next()]
    del it
    gc.collect()
    for b, batch in enumerate(batches):
        np.testing.assert_array_equal(batch.data[0].asnumpy(), np.stack([_chw(images[4 * b + i][1]) for i in range(4)]))
    sym = mx.sym.sum(mx.sym.var("data"), axis=(1, 2, 3))  # per-sample pixel sum
    mod = mx.mod.Module(sym, data_names=["data"], label_names=None, context=mx.cpu())
    mod.bind(data_shapes=[("data", (4, 3, S, S))], for_training=False)
    mod.init_params()
    mod.forward(mx.io.DataBatch(batches[1].data), is_train=False)
    expected = [float(_chw(images[4 + i][1]).sum()) for i in range(4)]
    np.testing.assert_allclose(mod.get_outputs()[0].asnumpy(), expected, rtol=1e-6)
    doubled = (batches[0].data[0] * 2).asnumpy()
    np.testing.assert_array_equal(doubled, 2 * np.stack([_chw(images[i][1]) for i in range(4)]))


def test_decode_matches_mxnet_imdecode_and_resize_short():
    rng = np.random.default_rng(3)
    rgb = cv2.GaussianBlur(rng.integers(0, 256, (24, 36, 3), dtype=np.uint8), (5, 5), 0)
    for payload, atol in ((_png(rgb), 0), (cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes(), 1)):
        ref = mx.image.imdecode(payload).asnumpy()  # RGB
        ref_resized = mx.image.resize_short(mx.image.imdecode(payload), 12).asnumpy()  # 12 x 18, bicubic
        ours = augment.decode_image(payload, (12, 18), "rec record 1")
        assert ours.shape == ref_resized.shape == (12, 18, 3)
        assert np.abs(ours.astype(int) - ref_resized.astype(int)).max() <= atol + 1
        same = augment.decode_image(payload, (24, 36))
        assert np.abs(same.astype(int) - ref.astype(int)).max() <= atol
    np.testing.assert_array_equal(augment.decode_image(_png(rgb), (24, 36)), rgb)
    with pytest.raises(ValueError, match=r"train.rec record 7: image is 12x18 after resize_short, expected 12x12"):
        augment.decode_image(_png(rgb), (12, 12), "train.rec record 7")
    with pytest.raises(augment.ImageDecodeError, match=r"rec record 2: 5 bytes do not decode"):
        augment.decode_image(b"hello", (12, 12), "rec record 2")


def test_images_filter_keeps_labels(tmp_path):
    rec, images = _make_rec(tmp_path, counts=(3, 4, 2, 5))
    it = FaceImageIter(1, (3, S, S), rec, images_filter=4, num_workers=0)
    assert len(it.id2range) == 2 and len(it.imgidx) == 9 and it.num_classes == 4
    labels = [lab for _, lab in _epoch(it)]
    assert np.concatenate(labels).tolist() == [1] * 4 + [3] * 5  # labels not remapped, as upstream
    it = FaceImageIter(2, (3, S, S), rec, images_filter=0, num_workers=0)
    assert len(it.imgidx) == 14


def test_mirror_deterministic_and_equal_across_worker_counts(tmp_path):
    rec, images = _make_rec(tmp_path, counts=(5, 6, 7))
    runs = []
    for workers in (0, 1, 3):
        it = FaceImageIter(4, (3, S, S), rec, shuffle=True, rand_mirror=True, seed=11, num_workers=workers)
        runs.append([_epoch(it), (it.reset(), _epoch(it))[1]])
    for other in runs[1:]:
        for ep_a, ep_b in zip(runs[0], other):
            assert len(ep_a) == len(ep_b) == 4
            for (da, la), (db, lb) in zip(ep_a, ep_b):
                np.testing.assert_array_equal(da, db)
                np.testing.assert_array_equal(la, lb)
    flips = []
    for data, label in runs[0][0]:
        for sample, lab in zip(data, label):
            k, mirrored = _match(sample, images)
            assert images[k][0] == lab
            flips.append(mirrored)
    assert 0 < sum(flips) < len(flips)  # both outcomes occur (16 draws)
    other_seed = _epoch(FaceImageIter(4, (3, S, S), rec, shuffle=True, rand_mirror=True, seed=12, num_workers=0))
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(runs[0][0], other_seed))


def test_reset_reshuffles(tmp_path):
    rec, images = _make_rec(tmp_path, counts=(4, 4, 4, 4))
    it = FaceImageIter(4, (3, S, S), rec, shuffle=True, seed=0, num_workers=1)
    orders = []
    for _ in range(3):
        order = [_match(s, images)[0] for data, _ in _epoch(it) for s in data]
        assert sorted(order) == list(range(16))  # a permutation: every image exactly once
        orders.append(order)
        it.reset()
    assert orders[0] != orders[1] and orders[1] != orders[2]


def test_cutoff_square_of_128(tmp_path):
    rec, images = _make_rec(tmp_path, counts=(10, 10))
    it = FaceImageIter(5, (3, S, S), rec, cutoff=6, seed=4, num_workers=2)
    applied = 0
    for b, (data, _) in enumerate(_epoch(it)):
        for i, sample in enumerate(data):
            ref = _chw(images[5 * b + i][1])
            diff = np.any(sample != ref, axis=0)
            if not diff.any():
                continue
            applied += 1
            rows, cols = np.flatnonzero(diff.any(1)), np.flatnonzero(diff.any(0))
            r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            assert r1 - r0 <= 6 and c1 - c0 <= 6  # at most cutoff x cutoff (clipped at borders)
            assert (sample[:, r0:r1, c0:c1] == 128).all()
            outside = np.ones((S, S), bool)
            outside[r0:r1, c0:c1] = False
            np.testing.assert_array_equal(sample[:, outside], ref[:, outside])
    assert 3 <= applied <= 17  # probability 1/2 over 20 samples


def test_apply_cutoff_reference():
    img = np.zeros((8, 10, 3), np.float32)
    augment.apply_cutoff(img, 4, (1, 9), fill=127.5)
    expected = np.zeros((8, 10, 3), np.float32)
    expected[0:3, 7:10, :] = 127.5  # rows max(0,1-2)..min(8,1+2), cols 9-2..min(10,9+2)
    np.testing.assert_array_equal(img, expected)
    rng = np.random.default_rng(0)
    assert all(augment.draw_cutoff(rng, (8, 10), prob=1.0) is not None for _ in range(50))
    assert augment.apply_cutoff(img, 0, (1, 1)) is img


@pytest.mark.parametrize("op, aug_cls", [(0, mx.image.BrightnessJitterAug), (1, mx.image.ContrastJitterAug),
                                         (2, mx.image.SaturationJitterAug)])
def test_color_jitter_matches_mxnet_augmenters(op, aug_cls):
    rng = np.random.default_rng(op)
    img = rng.integers(0, 256, (6, 7, 3)).astype(np.float32)
    random.seed(100 + op)
    alpha = 1.0 + random.uniform(-0.125, 0.125)  # the draw the mxnet augmenter will make
    random.seed(100 + op)
    ref = aug_cls(0.125)(mx.nd.array(img)).asnumpy()
    params = {"order": [op], "alpha": np.array([alpha] * 3), "quality": None}
    np.testing.assert_allclose(augment.apply_color_jitter(img.copy(), params), ref, rtol=1e-5, atol=1e-3)


def test_draw_color_jitter_keeps_numpys_uniform_stream():
    """draw_color_jitter's alphas are bitwise those of Generator.uniform(-r, r) from the same stream (the spelled-out
    form is only faster), and the generator ends in the same state."""
    for seed in range(50):
        rng, ref = np.random.default_rng(seed), np.random.default_rng(seed)
        for _ in range(20):
            drawn = augment.draw_color_jitter(rng, brightness=0.125, contrast=0.3, saturation=1e-3, jpeg=True)
            quality = None
            if ref.integers(0, 2) == 1:
                quality = int(ref.integers(2, 21))
            ranges = np.array([0.125, 0.3, 1e-3])
            alpha = 1.0 + ref.uniform(-ranges, ranges)
            order = ref.permutation(3)
            assert drawn["quality"] == quality
            np.testing.assert_array_equal(drawn["alpha"], alpha)
            np.testing.assert_array_equal(drawn["order"], order)
        assert rng.bit_generator.state == ref.bit_generator.state


def test_color_jitter_formulas_and_draws():
    img = np.array([[[10, 20, 30], [200, 100, 0]]], np.uint8)
    x = img.astype(np.float64)
    a = np.array([1.1, 0.9, 1.05])
    params = {"order": [2, 0, 1], "alpha": a, "quality": None}
    g = (x * [0.299, 0.587, 0.114]).sum(2, keepdims=True)
    x = a[2] * x + (1 - a[2]) * g
    x = a[0] * x
    x = a[1] * x + (1 - a[1]) * 3 * (x * [0.299, 0.587, 0.114]).mean()
    np.testing.assert_allclose(augment.apply_color_jitter(img, params), x, rtol=1e-5)
    rng = np.random.default_rng(0)
    draws = [augment.draw_color_jitter(rng, jpeg=True) for _ in range(400)]
    alphas = np.array([d["alpha"] for d in draws])
    assert alphas.min() >= 0.875 and alphas.max() <= 1.125
    qualities = [d["quality"] for d in draws if d["quality"] is not None]
    assert 150 < len(qualities) < 250 and min(qualities) == 2 and max(qualities) == 20
    assert all(sorted(d["order"]) == [0, 1, 2] for d in draws)
    jpeg = augment.jpeg_compress(np.full((16, 16, 3), 90, np.uint8), 10)
    assert jpeg.shape == (16, 16, 3) and jpeg.dtype == np.uint8 and np.abs(jpeg.astype(int) - 90).max() <= 3


def test_color_jittering_iterator_deterministic(tmp_path):
    rec, images = _make_rec(tmp_path, counts=(4, 4))
    a = _epoch(FaceImageIter(4, (3, S, S), rec, color_jittering=2, seed=1, num_workers=0))
    b = _epoch(FaceImageIter(4, (3, S, S), rec, color_jittering=2, seed=1, num_workers=2))
    for (da, _), (db, _) in zip(a, b):
        np.testing.assert_array_equal(da, db)
    assert not np.array_equal(a[0][0][0], _chw(images[0][1]))
    assert not np.allclose(a[0][0], np.round(a[0][0]))  # unclipped float jitter, as upstream


def test_aug_list_seeded_per_sample(tmp_path):
    rec, _ = _make_rec(tmp_path, counts=(4, 4))

    def noise(img, rng):
        return img.astype(np.float32) + rng.normal(0, 1, img.shape).astype(np.float32)

    a = _epoch(FaceImageIter(4, (3, S, S), rec, aug_list=[noise], seed=2, num_workers=0))
    b = _epoch(FaceImageIter(4, (3, S, S), rec, aug_list=[noise], seed=2, num_workers=3))
    np.testing.assert_array_equal(a[1][0], b[1][0])


def test_label_outside_num_classes_is_an_error(tmp_path):
    rec, _ = _make_rec(tmp_path, counts=(2, 2, 2), num_classes=2)
    for workers in (0, 1):
        it = FaceImageIter(2, (3, S, S), rec, num_workers=workers)
        with pytest.raises(ValueError, match=r"train.rec record 5: label 2 is outside 0..1 \(num_classes=2"):
            _epoch(it)
    it = FaceImageIter(2, (3, S, S), rec, num_workers=0, num_classes=3)  # explicit num_classes wins
    assert len(_epoch(it)) == 3


def test_corrupt_record_skipped_counted_logged(tmp_path, caplog):
    rec, images = _make_rec(tmp_path, counts=(3, 3), corrupt=1)
    it = FaceImageIter(2, (3, S, S), rec, num_workers=2)
    with caplog.at_level(logging.WARNING, logger="iterators.face_iter"):
        batches = _epoch(it)
    assert it.num_corrupt == 1
    assert "train.rec record 2 skipped (corrupt" in caplog.text
    got = [_match(s, images)[0] for data, _ in batches for s in data]
    assert got == [0, 2, 3, 4]  # record 2 (image 1) skipped, the next ones move up; 5 good images -> 2 batches


def test_wrong_image_size_is_an_error(tmp_path):
    rec, _ = _make_rec(tmp_path, counts=(2,), size=(S, S + 4))
    it = FaceImageIter(1, (3, S, S), rec, num_classes=1, num_workers=1)
    with pytest.raises(ValueError, match=r"train.rec record 1: image is 16x20 after resize_short, expected 16x16"):
        it.next()


def test_constructor_errors(tmp_path):
    rec, _ = _make_rec(tmp_path)
    with pytest.raises(ValueError, match="mean=.* is not supported: the network already normalises"):
        FaceImageIter(2, (3, S, S), rec, mean=(127.5, 127.5, 127.5))
    with pytest.raises(TypeError):
        FaceImageIter(2, (3, S, S), rec, rand_mirorr=True)  # misspelt flag is not swallowed
    with pytest.raises(ValueError, match=r"data_shape must be \(3, H, W\), got \(1, 16, 16\)"):
        FaceImageIter(2, (1, S, S), rec)
    with pytest.raises(ValueError, match=r"9 usable images \(images_filter=0\), fewer than batch_size=10"):
        FaceImageIter(10, (3, S, S), rec)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        FaceImageIter(0, (3, S, S), rec)
    with pytest.raises(ValueError, match="cutoff must be a non-negative integer, got -1"):
        FaceImageIter(2, (3, S, S), rec, cutoff=-1)
    with pytest.raises(FileNotFoundError, match=r"record file not found: .*missing.rec"):
        FaceImageIter(2, (3, S, S), str(tmp_path / "missing.rec"))
    (tmp_path / "property").unlink()
    # insightface's FaceImageIter needs only .rec/.idx: the header's identity records give num_classes.
    assert FaceImageIter(2, (3, S, S), rec).num_classes == 3
    assert FaceImageIter(2, (3, S, S), rec, num_classes=3, ctx_num=2).ctx_num == 2  # accepted, ignored
    assert FaceImageIter(2, (3, S, S), rec, num_classes=3, cutoff=False).cutoff == 0  # HEAD's data_cutoff=False
    (tmp_path / "train.idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"index file not found: .*train.idx"):
        FaceImageIter(2, (3, S, S), rec, num_classes=3)


def test_headerless_rec(tmp_path):
    w = mx.recordio.MXIndexedRecordIO(str(tmp_path / "s.idx"), str(tmp_path / "s.rec"), "w")
    img = np.full((S, S, 3), 7, np.uint8)
    for k in range(4):
        w.write_idx(k, mx.recordio.pack(mx.recordio.IRHeader(0, float(k % 2), k, 0), _png(img + k)))
    w.close()
    it = FaceImageIter(2, (3, S, S), str(tmp_path / "s.rec"), num_classes=2, num_workers=0)
    batches = _epoch(it)
    assert [b[1].tolist() for b in batches] == [[0, 1], [0, 1]]
    assert [b[0][1, 0, 0, 0] for b in batches] == [8, 10]
    with pytest.raises(ValueError, match="images_filter=2 needs identity records"):
        FaceImageIter(2, (3, S, S), str(tmp_path / "s.rec"), num_classes=2, images_filter=2)
    # No header, no property, no num_classes: nothing to derive the classes from.
    with pytest.raises(FileNotFoundError, match=r"property file not found: .*property.*or pass num_classes"):
        FaceImageIter(2, (3, S, S), str(tmp_path / "s.rec"))


def test_rec_without_property_file(tmp_path):
    """insightface's FaceImageIter reads only train.rec/.idx; property is optional (read when present)."""
    rec, images = _make_rec(tmp_path, counts=(3, 4, 2))
    with_property = _epoch(FaceImageIter(2, (3, S, S), rec, shuffle=True, rand_mirror=True, seed=3, num_workers=0))
    (tmp_path / "property").unlink()
    it = FaceImageIter(2, (3, S, S), rec, shuffle=True, rand_mirror=True, seed=3, num_workers=0)
    assert it.num_classes == 3 and "identity records" in it.num_classes_source
    without = _epoch(it)
    assert len(without) == len(with_property) == 4
    for (da, la), (db, lb) in zip(with_property, without):
        np.testing.assert_array_equal(da, db)
        np.testing.assert_array_equal(la, lb)


def test_num_classes_from_identity_records_with_a_class_without_images(tmp_path):
    """Labels 0, 1, 3 (class 2 has no image): C = highest label + 1, not the number of identity records."""
    from iterators.face_iter import num_classes_from_identity_records
    from iterators.formats.recordio import FaceRecordReader
    img = np.full((S, S, 3), 9, np.uint8)
    write_face_rec(tmp_path, [(lab, _png(img)) for lab in (0, 0, 1, 1, 3, 3)], image_size=(S, S))
    rec = str(tmp_path / "train.rec")
    (tmp_path / "property").unlink()
    with FaceRecordReader(rec) as reader:
        assert num_classes_from_identity_records(reader) == 4
    it = FaceImageIter(2, (3, S, S), rec, num_workers=0)
    assert it.num_classes == 4
    assert [lab.tolist() for _, lab in _epoch(it)] == [[0, 0], [1, 1], [3, 3]]


def test_iterators_package_exports_face_image_iter():
    import iterators
    assert iterators.FaceImageIter is FaceImageIter


def _previous_load(it, rid, params):
    """The decode path FaceImageIter used before it decoded into the batch buffer (RGB HWC, one float32 array per
    sample): the reference its batches must equal bitwise."""
    mirror, color, centre, aug_seed = params
    label, payload = it.reader.read(rid)
    try:
        img = augment.decode_image(payload, it.image_size)
    except augment.ImageDecodeError:
        return label, None
    if mirror:
        img = augment.mirror(img)
    if color is not None:
        img = augment.apply_color_jitter(img, color)
    if centre is not None:
        img = augment.apply_cutoff(img, it.cutoff, centre, 128)
    if it.aug_list:
        rng = np.random.default_rng(aug_seed)
        for aug in it.aug_list:
            img = aug(img, rng)
    return label, augment.to_chw_float(img)


def _previous_epochs(it, epochs):
    """Batches of ``epochs`` epochs built the previous way: draws in sequence order from the epoch's generator, the
    previous per-sample decode, corrupt records skipped, samples appended row by row, last partial batch dropped."""
    out = []
    for epoch in range(epochs):
        it._epoch = epoch
        it._start_epoch()
        samples = [_previous_load(it, rid, it._draw()) for rid in it.seq.tolist()]
        good = [(lab, arr) for lab, arr in samples if arr is not None]
        for b in range(len(good) // it.batch_size):
            rows = good[b * it.batch_size:(b + 1) * it.batch_size]
            out.append((np.stack([a for _, a in rows]), np.array([lab for lab, _ in rows], dtype=np.float32)))
    return out


@pytest.mark.parametrize("aug", [dict(rand_mirror=True), dict(rand_mirror=True, cutoff=6),
                                 dict(rand_mirror=True, color_jittering=2, cutoff=6),
                                 dict(rand_mirror=True, aug_list=[lambda img, rng: img * np.float32(0.5)])])
def test_batches_bitwise_equal_to_the_previous_decode_path(tmp_path, aug):
    """Decoding straight into the batch buffer (BGR until the final cast, rows moved up after skipped records)
    gives bitwise the batches of the previous path, for JPEG and PNG, resized images, corrupt records (several,
    across batch boundaries), shuffle, 0 or 2 workers, two epochs."""
    rng = np.random.default_rng(5)
    items, corrupt = [], {3, 9, 10, 22}
    for k in range(40):
        size = (S + 4, S + 4) if k % 7 == 0 else (S, S)  # some go through resize_short
        rgb = cv2.GaussianBlur(rng.integers(0, 256, size + (3,), dtype=np.uint8), (3, 3), 0)
        payload = _png(rgb) if k % 2 else cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
        items.append((k // 4, b"\xff\xd8 not really a jpeg" if k in corrupt else payload))
    write_face_rec(tmp_path, items, image_size=(S, S))
    rec = str(tmp_path / "train.rec")
    ref = _previous_epochs(FaceImageIter(6, (3, S, S), rec, shuffle=True, seed=3, num_workers=0, **aug), 2)
    assert len(ref) == 2 * (36 // 6)
    for workers in (0, 2):
        it = FaceImageIter(6, (3, S, S), rec, shuffle=True, seed=3, num_workers=workers, **aug)
        got = _epoch(it) + (it.reset(), _epoch(it))[1]
        assert len(got) == len(ref)
        for (data, label), (rdata, rlabel) in zip(got, ref):
            np.testing.assert_array_equal(data, rdata)
            np.testing.assert_array_equal(label, rlabel)
        it.close()


def test_decode_bgr_equals_decode_image_and_bgr_to_chw_float_equals_to_chw_float():
    rng = np.random.default_rng(9)
    for shape in ((16, 16), (20, 20), (16, 24), (22, 30)):
        rgb = cv2.GaussianBlur(rng.integers(0, 256, shape + (3,), dtype=np.uint8), (3, 3), 0)
        for payload in (_png(rgb), cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()):
            size = (16, 16 * shape[1] // shape[0])
            rgb_img = augment.decode_image(payload, size)
            bgr_img = augment.decode_bgr(payload, size)
            np.testing.assert_array_equal(cv2.cvtColor(bgr_img, cv2.COLOR_BGR2RGB), rgb_img)
            out = np.full((3,) + size, np.nan, dtype=np.float32)
            np.testing.assert_array_equal(augment.bgr_to_chw_float(bgr_img, out), augment.to_chw_float(rgb_img))
    with pytest.raises(augment.ImageDecodeError, match=r"rec record 2: 5 bytes do not decode"):
        augment.decode_bgr(b"hello", (12, 12), "rec record 2")


def _previous_apply_color_jitter(img, params):
    """apply_color_jitter as first written: the jitters one after the other in float32, numpy broadcasting over the
    channel axis (MXNet's augmenters' arithmetic)."""
    if params["quality"] is not None:
        img = augment.jpeg_compress(img, params["quality"])
    x = img.astype(np.float32)
    for op in params["order"]:
        a = np.float32(params["alpha"][op])
        if op == 0:
            x *= a
        elif op == 1:
            gray = (x * augment.GRAY_COEF).sum(dtype=np.float32) * np.float32(3.0 * (1.0 - a) / x.size)
            x *= a
            x += gray
        else:
            gray = (x * augment.GRAY_COEF).sum(axis=2, keepdims=True, dtype=np.float32)
            gray *= np.float32(1.0 - a)
            x *= a
            x += gray
    return x


def test_apply_color_jitter_equals_the_step_by_step_version():
    """The composed affine map equals the jitters applied one by one in float32 up to float32 rounding (values up
    to ~600: a few ulp); a wrong coefficient, order or contrast mean moves pixels by whole units."""
    rng = np.random.default_rng(4)
    for k in range(150):
        shape = (112, 112) if k % 3 else tuple(int(v) for v in rng.integers(1, 60, 2))
        img = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
        if k % 2:
            img = img.astype(np.float32) * np.float32(1.7)  # float input (e.g. after an earlier augmenter)
        params = augment.draw_color_jitter(rng, jpeg=k % 4 == 0 and img.dtype == np.uint8)
        want = _previous_apply_color_jitter(img, params)
        got = augment.apply_color_jitter(img, params)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=5e-4)
        out = np.full(shape + (3,), np.nan, dtype=np.float32)
        assert augment.apply_color_jitter(img, params, out=out) is out
        np.testing.assert_array_equal(out, got)
