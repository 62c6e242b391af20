"""insightface HEAD angular-triplet fine-tuning (``loss.atriplet``): as ``triplet_r100_emore.py`` with the
``atriplet`` head, mean relu(acos(a.p) - acos(a.n) + alpha), alpha 0.35 radians (insightface ``sample_config.py`` ``loss.atriplet``).
"""
base = "triplet_r100_emore.py"
config = {
    "loss": "atriplet",
    "triplet_alpha": 0.35,
}
