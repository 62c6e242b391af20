"""MobileFaceNet (y1) stage 2: ArcFace fine-tuning from the softmax pre-training of ``y1_softmax_emore.py``.

Weights only are loaded (``pretrained``; the embedding checkpoint has no fc7, which is initialised afresh);
optimizer state and step start from zero. Point ``--pretrained`` at the stage-1 run if it lives elsewhere.
"""
base = "y1_softmax_emore.py"
config = {
    "loss": "arcface",
    "loss_s": 64.0,
    "loss_m2": 0.5,
    "pretrained": "./models/y1-softmax-emore/model,1",
}
