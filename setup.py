# The C kernels are optional: where they cannot be built, adasum falls back to PyTorch ops.
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "adasum._kernels",
            sources=["src/adasum/_kernels.c"],
            extra_compile_args=["-O3", "-fopenmp-simd", "-ffp-contract=off", "-std=gnu11"],
            optional=True,
        )
    ]
)
