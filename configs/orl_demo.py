"""``make demo``: ORL faces (30 training people, 300 images), CPU, from scratch, a couple of minutes.

Recipe chosen on a split of the 30 TRAINING people (``python -m recognition.demo --validation-split 8``:
train on 22, verify on 8; raw pixels give 0.933 on that pack at every input size), never on the 10
held-out people. Numbers are the final weights after 400 steps unless noted; the 10-fold std is ~0.03 and
seeds of one recipe differ by up to ~0.02, so differences below ~0.02 are noise.

* quarter-width r18 at 32x32 input (ORL's 92x112 faces padded to square, then resized): 32 px ->
  0.925, 0.927, 0.922, 0.905 (seeds 0-3, mean 0.920), 48 px -> 0.910, 64 px -> 0.932 (earlier runs:
  0.905-0.937), i.e. the same within noise, while 32 px trains ~4x faster than 64 px (~260 vs ~60
  images/s alone on one thread; 112 px is another ~2.4x slower than 64 px), so the demo stays far below
  10 minutes even on a loaded machine;
* ArcFace with s=32, m=0.3: s=64/m=0.5 is tuned for 85k identities; with 22-30 classes a smaller scale and
  margin train stably from scratch. 64 px: m=0.5 + 16-pixel cutoff -> 0.915; s=16 -> 0.908;
  32 px: CosFace s=32 m3=0.35 -> 0.898;
* 400 steps of 30 images (40 epochs), lr 0.1 -> x0.1 at 250 and 350: the validation accuracy plateaus
  from step ~200-300, so longer training buys nothing.
* Also tried on the validation split: head 'I' (BN-FC-BN, no dropout) at 64 px -> 0.897 (GDC needs a 7x7
  map, i.e. 112 px); random affine (zoom 10%, 10 deg, 8% shift, ``--affine``) at 32 px -> 0.870, with
  width x0.5 and 800 steps -> 0.86-0.89, and at 64 px with colour jitter -> 0.925 (+ wd 5e-3 -> 0.920);
  width x1.0 at 32 px -> 0.873 at step 100 (4x slower, stopped); plain softmax -> 0.925; emb 32 +
  m=0.5 -> 0.932; pre-training on 500 synthetic identities (``iterators.tools.datasets.build_synthetic``, 10
  images each, 32 px, plain softmax, 600 steps, ~2 min; 0.818 on the ORL split without fine-tuning) then
  this recipe with ``pretrained`` -> 0.932 (seed 0) and 0.893 (seed 1), lr 0.01 -> 0.900: no gain;
  ensembles of the 32 px seeds (concatenated L2-normalised flip-summed embeddings) -> 0.933 (2 seeds),
  0.922 (3), 0.930 (4): no gain beyond noise, so the demo trains one model.
  On the validation split NO recipe tried beats raw pixels by the hoped-for 0.03. ORL pairs are easy for pixels (same
  session, background and position); 22-30 training identities are too few for the embedding to
  generalise much beyond that.

Held-out (10 people, 600 pairs, final weights; measured once, after the recipe was chosen): 0.93000 +- 0.032
vs raw pixels 0.89667 +- 0.051 (+0.033; bit-identical on a rerun at 32 px), 72 s total on a lightly loaded
machine (load 1.2-1.6). With ``--set seed=1``: 0.91500 (+0.018), so the +0.03 margin depends on the seed.
The earlier 64 px recipe gave 0.905 and 0.920 vs pixels 0.900.
"""
config = {
    "network": "r18",
    "net_multiplier": 0.25,
    "emb_size": 128,
    "image_shape": [32, 32, 3],
    "loss": "arcface",
    "loss_s": 32.0,
    "loss_m2": 0.3,
    "dataset": "orl",
    "val_targets": ["orl"],
    "per_batch_size": 30,
    "lr": 0.1,
    "lr_steps": [250, 350],
    "max_steps": 400,
    "wd": 0.0005,
    "frequent": 5,
    "verbose": 100,
    "ckpt": 3,
    "data_rand_mirror": True,
    "data_workers": 2,
    "seed": 0,
}
