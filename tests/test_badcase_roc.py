"""eval.verification --mode 1 (insightface's test_badcase grids) and the all-pairs ROC / TPR@FAR table."""
import math
import re

import cv2
import mxnet as mx
import numpy as np
import pytest

from eval import badcase, roc
from eval import verification as ver
from eval.protocol import calculate_accuracy, kfold
from iterators.formats.bin_pack import write_bin

HW = 16


# ----------------------------------------------------------------------------- TPR@FAR, by hand
def test_tpr_at_far_hand_computed():
    # 5 genuine, 10 impostor pairs: a FAR of 1e-1 allows 1 accepted impostor (0.3); at t = 0.5 the genuine
    # 0.1, 0.2, 0.5 are accepted and only that impostor: TPR 3/5. 1e-2 needs >= 100 impostors: n/a.
    pos = [0.1, 0.2, 0.5, 0.9, 1.5]
    neg = [0.3, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2]
    dist = np.array(pos + neg)
    issame = [True] * 5 + [False] * 10
    table = roc.tpr_at_fars(dist, issame)
    assert table[1e-1] == pytest.approx(0.6)
    assert all(table[f] is None for f in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6))
    # 100 impostors at 1.00, 1.01, ..., 1.99: FAR 1e-2 allows the one at 1.00 -> genuine <= 1.005 (3 of 5);
    # FAR 1e-1 allows 1.00 .. 1.09 -> genuine <= 1.09 (4 of 5)
    pos = [0.5, 0.95, 1.005, 1.015, 1.5]
    neg = list(1.0 + 0.01 * np.arange(100))
    table = roc.tpr_at_fars(np.array(pos + neg), [True] * 5 + [False] * 100)
    assert table[1e-1] == pytest.approx(0.8) and table[1e-2] == pytest.approx(0.6) and table[1e-3] is None
    lines = roc.format_tpr_at_fars("toy", table, 100)
    assert lines[0] == "[toy]ROC TPR@FAR=1e-01: 0.80000" and lines[2] == "[toy]ROC TPR@FAR=1e-03: n/a (100 negative pairs)"
    far, tpr, thr = roc.roc_points(np.array(pos + neg), [True] * 5 + [False] * 100)
    assert far[0] == tpr[0] == 0 and far[-1] == tpr[-1] == 1 and np.all(np.diff(far) >= 0) and np.all(np.diff(tpr) >= 0)


def test_roc_plot_has_a_log_far_axis(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    saved = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, path, **kw):
        saved["xscale"] = fig.axes[0].get_xscale()
        saved["xlim"] = fig.axes[0].get_xlim()
        return real_savefig(fig, path, **kw)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    far, tpr, _ = roc.roc_points(np.linspace(0, 2, 300), [k % 2 == 0 for k in range(300)])
    path = roc.plot_roc([("toy", far, tpr)], str(tmp_path / "roc.png"))
    assert saved["xscale"] == "log" and saved["xlim"][0] == pytest.approx(1e-3) and saved["xlim"][1] == 1.0
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- bad cases
def _upstream_badcases(dist, issame, nfolds):
    """insightface test_badcase's loops, verbatim in spirit (calculate_accuracy per threshold)."""
    thresholds = np.arange(0, 4, 0.01)
    issame = np.asarray(issame)
    pouts, nouts = [], []
    for train_set, test_set in kfold(len(dist), nfolds):
        acc_train = np.zeros(len(thresholds))
        for i, t in enumerate(thresholds):
            _, _, acc_train[i] = calculate_accuracy(t, dist[train_set], issame[train_set])
        best = thresholds[np.argmax(acc_train)]
        for iid in test_set:
            violate = dist[iid] - best
            if not issame[iid]:
                violate *= -1.0
            if violate > 0.0:
                (pouts if issame[iid] else nouts).append((int(iid), float(dist[iid]), float(best)))
    return sorted(pouts, key=lambda x: x[1], reverse=True), sorted(nouts, key=lambda x: x[1])


def test_find_badcases_hand_example_and_upstream_loops():
    # one fold (train = test = all): best threshold 0.11 (first maximum, 4/6); genuine 0.605 and 0.305 are
    # above it (false negatives, largest first); no impostor is below it
    dist = np.array([0.105, 0.205, 0.305, 0.505, 0.605, 0.805])
    issame = [True, False, True, False, True, False]
    pouts, nouts, acc = badcase.find_badcases(dist, issame, nrof_folds=1)
    assert [(p, d) for p, d, _ in pouts] == [(4, 0.605), (2, 0.305)] and nouts == []
    assert pouts[0][2] == pytest.approx(0.11) and acc == pytest.approx(4 / 6)
    rng = np.random.default_rng(0)
    issame = rng.random(200) < 0.5
    dist = np.where(issame, rng.normal(0.9, 0.3, 200), rng.normal(1.5, 0.3, 200)).astype(np.float32)
    pouts, nouts, _ = badcase.find_badcases(dist, issame, 10)
    ref_p, ref_n = _upstream_badcases(dist, issame, 10)
    assert [(p, t) for p, _, t in pouts] == [(p, pytest.approx(t)) for p, _, t in ref_p]
    assert [(p, t) for p, _, t in nouts] == [(p, pytest.approx(t)) for p, _, t in ref_n]
    assert pouts and nouts


def _pack(path, n_pairs=40, seed=0):
    rng = np.random.default_rng(seed)
    bins, issame = [], []
    for i in range(n_pairs):
        same = i % 2 == 0
        a = rng.integers(0, 256, size=(HW, HW, 3))
        noise = 60 if i % 5 == 0 else 10  # some genuine pairs are hard, some impostors look alike
        b = np.clip(a + rng.normal(0, noise, size=a.shape), 0, 255) if same or i % 7 == 3 else \
            rng.integers(0, 256, size=a.shape)
        for img in (a, b):
            bins.append(cv2.imencode(".png", img.astype(np.uint8))[1])
        issame.append(same)
    write_bin(path, bins, issame)


@pytest.fixture()
def setup(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _pack(data_dir / "lfw.bin")
    rng = np.random.default_rng(3)
    prefix = str(tmp_path / "model")
    sym = mx.sym.FullyConnected(mx.sym.Flatten(mx.sym.Variable("data")), num_hidden=8, name="fc1")
    mx.model.save_checkpoint(prefix, 1, sym, {"fc1_weight": mx.nd.array(rng.normal(0, 0.05, (8, 3 * HW * HW))),
                                              "fc1_bias": mx.nd.zeros((8,))}, {})
    return data_dir, prefix


def test_mode_1_writes_the_badcase_grids(setup, tmp_path, capsys):
    data_dir, prefix = setup
    out_dir = tmp_path / "badcases"
    code = ver.main(["--data-dir", str(data_dir), "--model", prefix + ",1", "--target", "lfw", "--cpu",
                     "--batch-size", "8", "--image-size", f"{HW},{HW}", "--mode", "1", "--badcase-dir", str(out_dir)])
    out = capsys.readouterr().out
    assert code == 0
    npos, nneg = (int(v) for v in re.search(r"^(\d+) (\d+)$", out, re.M).groups())
    assert re.search(r"^acc 0\.\d+", out, re.M)
    # the same counts as upstream's loops on the verifier's embeddings
    data_set = ver.load_bin(str(data_dir / "lfw.bin"), (HW, HW))
    model = ver.load_embedding_module(prefix, 1, mx.cpu(), 8, (HW, HW))
    result = ver.test(data_set, model, 8)
    from eval.protocol import _normalize_rows
    dist = roc.pair_distances(_normalize_rows(result.embeddings_list[0] + result.embeddings_list[1]))
    ref_p, ref_n = _upstream_badcases(dist, data_set[1], 10)
    assert (npos, nneg) == (len(ref_p), len(ref_n)) and npos > 0 and nneg > 0
    for count, name in ((npos, "lfw_positive(false_negative).png"), (nneg, "lfw_negative(false_positive).png")):
        grid = cv2.imread(str(out_dir / name))
        rows = math.ceil(count / 4)
        assert grid.shape == (HW * rows + 20, 2 * HW * 4 + 3 * 10, 3), name
    # the first false negative's faces are in the top-left cell (BGR), left to right
    first = ref_p[0][0]
    grid = cv2.imread(str(out_dir / "lfw_positive(false_negative).png"))
    face_a = data_set[0][0][2 * first].asnumpy().transpose(1, 2, 0)[..., ::-1]
    cell = grid[:HW, :HW].astype(int)
    assert np.mean(np.abs(cell - face_a)) < 40  # the distance text covers part of the cell
    lines = (out_dir / "lfw_badcases.tsv").read_text().splitlines()
    assert len(lines) == 1 + npos + nneg and lines[1].startswith(f"false_negative\t{first}\t")


def test_cli_prints_tpr_at_far_and_plots_log_roc(setup, tmp_path, capsys):
    data_dir, prefix = setup
    png, js = tmp_path / "roc.png", tmp_path / "r.json"
    code = ver.main(["--data-dir", str(data_dir), "--model", prefix + ",1", "--target", "lfw", "--cpu",
                     "--batch-size", "8", "--image-size", f"{HW},{HW}", "--roc-plot", str(png), "--json", str(js)])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"^\[lfw\]ROC TPR@FAR=1e-01: [01]\.\d{5}$", out, re.M)  # 20 impostor pairs: 1e-1 only
    assert re.search(r"^\[lfw\]ROC TPR@FAR=1e-02: n/a \(20 negative pairs\)$", out, re.M)
    assert re.search(r"^\[lfw\]TPR@FAR=1e-3: [01]\.\d{5}\+-", out, re.M)  # insightface's 10-fold line stays
    import json
    record = json.loads(js.read_text())["results"][0]
    assert record["roc_tpr_at_far"]["1e-02"] is None and 0 <= record["roc_tpr_at_far"]["1e-01"] <= 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
