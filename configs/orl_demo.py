"""``make demo``: ORL faces (30 training people, 300 images), CPU, from scratch, a few minutes.

Recipe chosen on a split of the 30 TRAINING people (``python -m recognition.demo --validation-split 8``:
train on 22, verify on 8), never on the 10 held-out people:

* quarter-width r18 at 64x64 input (ORL's 92x112 faces padded to square, then resized): 112x112 trains ~2.4x
  slower on CPU (7 vs 16.5 images/s measured side by side on the shared machine) and the demo must stay
  well under 10 minutes on 2 cores;
* ArcFace with s=32, m=0.3: s=64/m=0.5 is tuned for 85k identities; with 30 classes a smaller scale and
  margin train stably from scratch. Validation split, final weights after 400 steps: m=0.3 -> 0.932,
  m=0.5 + 16-pixel cutoff -> 0.915 (10-fold std ~0.03, so the two are close; the simpler one was kept);
* 400 steps of 30 images (40 epochs), lr 0.1 -> x0.1 at 250 and 350: the validation accuracy plateaued
  near 0.93 from step ~300 (0.903 @100, 0.927 @200, 0.937 @300), so longer training buys nothing.
* Also tried on the validation split (300 steps): + random affine (zoom 10%, 10 deg, 8% shift) and colour
  jitter -> 0.925; same with wd 5e-3 -> 0.920; plain softmax -> 0.925; emb 32 + m=0.5 -> 0.932 (0.84 @200).
  The raw-pixel baseline of that validation pack is 0.933, so NO recipe tried beats raw pixels on ORL by the
  hoped-for 0.03 (held-out, final weights: 0.905 and 0.920 in two runs -- MKLDNN threads are not
  bit-deterministic -- vs pixels 0.900). ORL pairs are easy for pixels (same session, background
  and position); 22-30 training identities are too few for the embedding to generalise much beyond that.
"""
config = {
    "network": "r18",
    "net_multiplier": 0.25,
    "emb_size": 128,
    "image_shape": [64, 64, 3],
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
