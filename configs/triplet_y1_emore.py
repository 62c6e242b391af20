"""OLD README triplet recipe (``src/train_triplet.py``): ``--lr 0.005 --mom 0.0 --per-batch-size 150``
on a MobileFaceNet pre-trained with softmax/ArcFace (the README used ``m1``; ``y1`` is the MobileFaceNet
this toolkit builds). 7200 images per bag is a multiple of 150 x G for G in 1, 2, 3, 4, 6, 8, 12.
``python -m recognition.train_triplet --config configs/triplet_y1_emore.py --pretrained <y1 prefix>,<epoch>``.
"""
config = {
    "network": "y1",
    "emb_size": 128,
    "net_output": "GDC",
    "loss": "triplet",
    "dataset": "emore",
    "dataset_path": "../datasets/faces_emore",
    "per_batch_size": 150,
    "lr": 0.005,
    "mom": 0.0,
    "lr_steps": [],
    "images_per_identity": 5,
    "triplet_bag_size": 7200,
    "triplet_alpha": 0.3,
    "triplet_max_ap": 0.0,
}
