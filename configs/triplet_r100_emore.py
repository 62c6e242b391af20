"""insightface HEAD triplet fine-tuning of r100 on emore (``sample_config.py`` ``loss.triplet``).

HEAD's ``loss.triplet`` sets ``per_batch_size 60``, ``lr 0.05``, ``images_per_identity 5``,
``triplet_bag_size 7200``, ``triplet_alpha 0.3``, ``triplet_max_ap 0``; ``mom`` stays HEAD's default 0.9
(the OLD README recipe with momentum 0 is ``triplet_y1_emore.py``). 7200 is a multiple of 60 x G for
G in 1, 2, 3, 4, 5, 6, 8, 10, 12 devices. Start from an ArcFace run:
``python -m recognition.train_triplet --config configs/triplet_r100_emore.py --pretrained <prefix>,<epoch>``.
"""
config = {
    "network": "r100",
    "loss": "triplet",
    "dataset": "emore",
    "dataset_path": "../datasets/faces_emore",
    "per_batch_size": 60,
    "lr": 0.05,
    "mom": 0.9,
    "lr_steps": [],
    "images_per_identity": 5,
    "triplet_bag_size": 7200,
    "triplet_alpha": 0.3,
    "triplet_max_ap": 0.0,
}
