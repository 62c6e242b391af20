"""Triplet fine-tuning of the ``make demo`` ORL model (``orl_demo.py``: quarter-width r18, 64x64, 128-d),
CPU, a few minutes. All 30 training people fit in one bag (30 x 5 = 150 images = 5 batches of 30).

``python -m recognition.train_triplet --config configs/triplet_orl.py --data-dir demo_run/data
--pretrained demo_run/model/model,0 --prefix demo_run/triplet/model``
"""
base = "orl_demo.py"
config = {
    "loss": "triplet",
    "per_batch_size": 30,
    "lr": 0.005,
    "mom": 0.0,
    "lr_steps": [],
    "max_steps": 100,
    "frequent": 5,
    "verbose": 50,
    "images_per_identity": 5,
    "triplet_bag_size": 150,
    "triplet_alpha": 0.3,
    "triplet_max_ap": 0.0,
}
