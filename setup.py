"""Installable package for the insightface-faithful MXNet face-recognition toolkit.

MXNet itself is chosen by an extra so one tree serves CPU and GPU machines:
``pip install -e .[cpu,test]`` (the ``mxnet`` wheel) or ``pip install -e .[gpu,test]``
(``mxnet-cu112`` plus the NVIDIA CUDA 11 runtime wheels, so a machine needs only the NVIDIA driver).
``make`` picks the extra by asking ``nvidia-smi`` for a GPU, and on GPU installs adds the import hook of
``eval/cuda_preload.py`` to the venv (``import mxnet`` then finds the wheels' libraries; no LD_LIBRARY_PATH).
Every dependency is pinned or capped: unpinned, pip backtracks through hundreds of MB of
scikit-learn/opencv/scipy releases that need numpy>=1.24, which MXNet 1.9.1 cannot import.
"""
from setuptools import find_packages, setup

MXNET_VERSION = "1.9.1"

# libmxnet.so of mxnet-cu112==1.9.1 needs these sonames (eval/cuda_preload.py loads them in this order):
# libcudart.so.11.0, libcublas(Lt).so.11, libcufft.so.10, libcurand.so.10, libcusolver.so.11, libnvrtc.so.11.2,
# libnvToolsExt.so.1, libnccl.so.2, libcudnn.so.8 -- and the driver's libcuda.so.1, which no wheel provides.
# CUDA 11.8 wheels serve a CUDA 11.2 build (minor-version compatibility; libnvrtc's soname stays .11.2);
# cuDNN 9 drops libcudnn.so.8. Pinned to the set proven together (ldd resolves all but libcuda.so.1);
# libcusparse is not needed (neither libmxnet.so nor libcusolver 11.4 links it).
CUDA_WHEELS = [
    "nvidia-cuda-runtime-cu11==11.8.89",
    "nvidia-cublas-cu11==11.11.3.6",
    "nvidia-cudnn-cu11==8.9.6.50",
    "nvidia-nccl-cu11==2.21.5",
    "nvidia-cufft-cu11==10.9.0.58",
    "nvidia-curand-cu11==10.3.0.86",
    "nvidia-cusolver-cu11==11.4.1.48",
    "nvidia-cuda-nvrtc-cu11==11.8.89",
    "nvidia-nvtx-cu11==11.8.86",
]

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
        "gpu": [f"mxnet-cu112=={MXNET_VERSION}"] + CUDA_WHEELS,
        "test": ["pytest>=7,<10", "pytest-timeout>=2.1,<3"],
        # python -m eval.export_onnx: MXNet 1.9's exporter imports onnx.mapping (gone in onnx 1.15) and onnx 1.14
        # needs protobuf<4; onnxruntime (1.26.0 checked on py3.11 with numpy 1.23.5 and protobuf 3.20.3) runs --check.
        "onnx": ["onnx>=1.14.1,<1.15", "protobuf>=3.20.2,<4", "onnxruntime>=1.16.3,<1.27"],
        # `--dist horovod`. Horovod compiles against the installed MXNet, so install it after mxnet with
        # `pip install --no-build-isolation` and HOROVOD_WITH_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1
        # HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_CPU_OPERATIONS=GLOO (GPU: also
        # HOROVOD_GPU_OPERATIONS=NCCL); `make install-dist` does exactly that (README, "Distributed training").
        "dist": ["horovod==0.28.1", "setuptools<70", "wheel", "cffi", "cloudpickle", "psutil", "pyyaml", "packaging"],
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
            "insightface-doctor=eval.doctor:main",
        ]
    },
)
