"""Build the C extension; every other piece of metadata is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "aiosync._seqc",
            sources=["aiosync/_seqc.c"],
            extra_compile_args=["-Wall", "-Wextra"],
        ),
        Extension(
            "aiosync._robust",
            sources=["aiosync/_robust.c"],
            extra_compile_args=["-Wall", "-Wextra"],
        ),
        Extension(
            "aiosync._waitc",
            sources=["aiosync/_waitc.c"],
            extra_compile_args=["-Wall", "-Wextra"],
        ),
    ]
)
