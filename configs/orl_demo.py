"""``make demo``: ORL faces (30 training people, 300 images), CPU, from scratch, about 6 minutes.

Quarter-width r18 (``net_multiplier`` 0.25) trains at ~50 images/s on 2 cores. Recipe chosen on a split of
the 30 training people (``python -m recognition.demo --validation-split 8``), never on the held-out 10.
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
