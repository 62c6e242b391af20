"""insightface HEAD's default recipe: LResNet100E-IR + ArcFace (s=64, m=0.5) on MS1M-ArcFace (emore).

Global batch 128 x GPUs, lr 0.1 -> x0.1 at 100k/160k/220k global batches, wd 5e-4, momentum 0.9,
verification on lfw/cfp_fp/agedb_30 every 2000 batches, best (agedb_30) into model-0001.
Run: python -m recognition.train_softmax --config configs/r100_arcface_emore.py --gpus 0,1,2,3
"""
config = {
    "network": "r100",
    "loss": "arcface",
    "loss_s": 64.0,
    "loss_m1": 1.0,
    "loss_m2": 0.5,
    "loss_m3": 0.0,
    "dataset": "emore",
    "dataset_path": "../datasets/faces_emore",
    "per_batch_size": 128,
    "lr": 0.1,
    "lr_steps": [100000, 160000, 220000],
}
