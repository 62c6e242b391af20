"""One-minute CPU quick start on generated identities (``python -m iterators.tools.datasets synthetic
--identities 50 --images-per-identity 20 --output data/synthetic``): quarter-width r18, ArcFace with a
gentle margin, verification on the held-out ``synthetic.bin`` every 100 batches.
"""
config = {
    "network": "r18",
    "net_multiplier": 0.25,
    "emb_size": 128,
    "loss": "arcface",
    "loss_s": 32.0,
    "loss_m2": 0.3,
    "dataset": "synthetic",
    "dataset_path": "data/synthetic",
    "val_targets": ["synthetic"],
    "per_batch_size": 32,
    "lr": 0.1,
    "lr_steps": [300, 450],
    "max_steps": 500,
    "frequent": 20,
    "verbose": 100,
    "ckpt": 3,
}
