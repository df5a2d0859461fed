from setuptools import find_packages, setup

setup(
    name="din-kernels",
    version="0.1.0",
    description="Deep Interest Network (DIN) for PyTorch with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["din_kernels", "din_kernels.*", "din", "din.*"]),
    package_data={"din.data": ["bundled/ml-latest-small/*"], "din_kernels": ["csrc/*.cpp", "csrc/*.h"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tqdm",
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "scikit-learn", "pyarrow"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["din = din.cli:main"]},
)
