"""detkit: the two-stage detection lineage (Selective Search -> R-CNN -> SPP-net ->
Fast R-CNN -> Faster R-CNN) behind one proposal interface and one region-head interface."""

from setuptools import find_packages, setup

setup(
    name="detkit",
    version="0.1.0",
    description="Run, study and compare the two-stage object-detection lineage",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["detkit", "detkit.*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy",
        "pycocotools",
        "opencv-python-headless",
        "scikit-learn",  # R-CNN's SVMs and ridge box regression
        # compiles the sequential merge loop of Felzenszwalb's segmentation (Selective Search)
        "numba",
        "scipy",  # classic Selective Search .mat proposal files
        "pyyaml",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # make test: the suite, its reference implementations (scikit-image's Felzenszwalb
        # segmentation for Selective Search), the TensorBoard writer, and the lint / type
        # checkers it runs first (pinned: their verdicts change between releases).
        # onnx / onnxruntime: the export parity tests run the ONNX files.
        "test": ["pytest", "scikit-image", "tensorboard", "ruff==0.17.6", "mypy==2.4.1", "onnx", "onnxruntime"],
        # detkit export --format onnx writes the file's metadata with onnx; with onnxruntime
        # the export is also run and checked against the eager model.
        "export": ["onnx", "onnxruntime"],
        # train.tensorboard: true (metrics and detection images in <run>/tensorboard).
        "tensorboard": ["tensorboard"],
        # OpenCV-contrib's selective search is only the peer we benchmark against; it
        # replaces the cv2 module of opencv-python-headless, so install it in a separate env.
        "bench": ["opencv-contrib-python-headless"],
    },
    entry_points={"console_scripts": ["detkit=detkit.cli:main"]},
)
