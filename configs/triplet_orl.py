"""Triplet fine-tuning of the ``make demo`` ORL model (``orl_demo.py``: quarter-width r18, 64x64, 128-d),
CPU, about 5 minutes.

Scaled down from insightface's recipe (lr 0.005, momentum 0, no decay) for 30 training people with 10 images
each: all 10 images per identity and one bag of the whole pool (300 images = 10 batches of 30). alpha 0.5
instead of 0.3 was chosen on the TRAINING people only: after ArcFace pre-training their mean ||a-p||^2 is
0.30 and ||a-n||^2 2.04, so alpha 0.3 leaves ~18 semi-hard triplets per bag (less than 2 batches of 10)
while 0.5 leaves ~80 (USERS.md #14: few triplets violate alpha after margin-softmax pre-training).

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
    "images_per_identity": 10,
    "triplet_bag_size": 300,
    "triplet_alpha": 0.5,
    "triplet_max_ap": 0.0,
}
