"""MobileFaceNet (y1) stage 1: plain softmax pre-training on emore (insightface's recipe for small nets:
margin losses from scratch tend to collapse MobileFaceNet, as insightface issues report), embedding 128-d with the GDC head (HEAD
``network.y1``). Stage 2 is ``y1_arcface_emore.py``, which loads this run's weights with ``--pretrained``.
"""
config = {
    "network": "y1",
    "emb_size": 128,
    "net_output": "GDC",
    "loss": "softmax",
    "dataset": "emore",
    "dataset_path": "../datasets/faces_emore",
    "per_batch_size": 128,
    "lr": 0.1,
    "lr_steps": [100000, 160000, 220000],
}
