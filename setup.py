from setuptools import setup

setup(
    name="nbp-video",
    version="0.1.0",
    description="Next-Block Prediction (NBP) video generation, native to transformers and diffusers",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # `pipelines/` and `conversion/` live at the top of the repository but install under the
    # `modeling_nbp` namespace, so no bare top-level `pipelines` or `conversion` module is created.
    packages=["modeling_nbp", "modeling_nbp.data", "modeling_nbp.evaluation", "modeling_nbp.training",
              "modeling_nbp.pipelines", "modeling_nbp.conversion"],
    package_dir={
        "modeling_nbp": "modeling_nbp",
        "modeling_nbp.pipelines": "pipelines",
        "modeling_nbp.conversion": "conversion",
    },
    # the bundled demo pipeline
    package_data={"modeling_nbp": ["assets/*.json", "pretrained/*/*.json", "pretrained/*/README.md",
                                   "pretrained/*/*/*.json", "pretrained/*/*/*.safetensors"]},
    install_requires=[
        # the lowest versions the package was run with: transformers 5.24 names create_causal_mask's `cache`,
        # accelerate 1.3 has unwrap_model(keep_torch_compile=...), transformers 5.24 needs torch 2.6
        "torch>=2.6,<3",
        "transformers>=5.24,<6",
        "diffusers>=0.40,<0.50",
        "accelerate>=1.3,<2",
        "datasets>=4.0,<6",
        "huggingface_hub>=1.0,<3",
        "safetensors>=0.4",
        "av>=14.1",  # VideoFrame.rotation
        "numpy>=1.24",
        "pillow>=9",
        "scipy>=1.10",
        "scikit-learn>=1.2",
        "tqdm",
        "tensorboard>=2.10",
    ],
    extras_require={"test": ["pytest>=7"]},
    entry_points={"console_scripts": ["nbp=modeling_nbp.cli:main"]},
)
