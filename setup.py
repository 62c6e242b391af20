"""Installable package for the insightface-faithful MXNet face-recognition toolkit.

MXNet itself is chosen by an extra so one tree serves CPU and GPU machines:
``pip install -e .[cpu,test]`` (the ``mxnet`` wheel) or ``pip install -e .[gpu,test]``
(``mxnet-cu112``). ``make`` picks the extra by asking ``nvidia-smi`` for a GPU.
Every dependency is pinned or capped: unpinned, pip backtracks through hundreds of MB of
scikit-learn/opencv/scipy releases that need numpy>=1.24, which MXNet 1.9.1 cannot import.
"""
from setuptools import find_packages, setup

MXNET_VERSION = "1.9.1"

setup(
    name="insightface-mx",
    version="0.1.0",
    description="Clean, tested re-creation of insightface's MXNet face-recognition training code",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9,<3.12",
    packages=find_packages(include=["recognition*", "symbols*", "iterators*", "metrics*", "eval*", "configs*"]),
    install_requires=[
        # MXNet 1.9.1 does `bool = onp.bool` at import time: numpy>=1.24 breaks `import mxnet`.
        "numpy==1.23.5",
        # 4.12 requires numpy 2; headless because training machines have no display (same cv2 API).
        "opencv-python-headless>=4.5,<4.12",
        "scikit-learn>=1.1.3,<1.8",
        "scipy>=1.9.2,<1.16",
        "easydict>=1.9,<2",
        "matplotlib>=3.6,<3.11",
    ],
    extras_require={
        "cpu": [f"mxnet=={MXNET_VERSION}"],
        "gpu": [f"mxnet-cu112=={MXNET_VERSION}"],
        "test": ["pytest>=7,<10", "pytest-timeout>=2.1,<3"],
    },
    entry_points={
        "console_scripts": [
            "insightface-train-softmax=recognition.train_softmax:main",
            "insightface-train-triplet=recognition.train_triplet:main",
            "insightface-verify=eval.verification:main",
            "insightface-build-rec=iterators.tools.build_rec:main",
            "insightface-datasets=iterators.tools.datasets:main",
            "insightface-inspect-dataset=iterators.tools.inspect_dataset:main",
            "insightface-build-bin=eval.build_bin:main",
        ]
    },
)
