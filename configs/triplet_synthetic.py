"""Triplet fine-tuning on the synthetic quick-start data (CPU, a minute): the network of
``synthetic.py`` with the triplet head, 5 images per identity, bags of 240 images (8 batches of 30).
``python -m recognition.train_triplet --config configs/triplet_synthetic.py --pretrained <synthetic run>/model,0``.
"""
base = "synthetic.py"
config = {
    "loss": "triplet",
    "per_batch_size": 30,
    "lr": 0.005,
    "mom": 0.0,
    "lr_steps": [],
    "max_steps": 100,
    "verbose": 50,
    "images_per_identity": 5,
    "triplet_bag_size": 240,
    "triplet_alpha": 0.3,
    "triplet_max_ap": 0.0,
}
