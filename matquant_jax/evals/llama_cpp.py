"""llama.cpp as an external judge of exported files: its log perplexity on the project's own
token windows (through its C API, `llama-cpp-python`'s ctypes binding) and its decode speed
(`llama-bench`). Never needed by the tests; benchmarks build it once from the
`llama-cpp-python` sdist on PyPI (it vendors llama.cpp: cmake and a C++ compiler, CPU only).
"""

from __future__ import annotations

import glob
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np

VERSION = '0.3.36'  # llama-cpp-python, vendoring the llama.cpp these files were checked with


def default_dir() -> str:
  return os.path.join(os.path.expanduser('~'), '.cache', 'matquant_jax', f'llama-cpp-python-{VERSION}')


def build(cache_dir: str | None = None) -> str:
  """The source tree of llama-cpp-python with llama.cpp built in vendor/llama.cpp/build-portable
  (libllama, llama-bench), built on first use: pip download of the sdist, cmake with
  GGML_NATIVE=OFF (so the build runs on any x86-64 with AVX2), a few minutes on 2 cores."""
  root = cache_dir or default_dir()
  src = os.path.join(root, f'llama_cpp_python-{VERSION}')
  bin_dir = os.path.join(src, 'vendor', 'llama.cpp', 'build-portable', 'bin')
  if os.path.exists(os.path.join(bin_dir, 'llama-bench')):
    return src
  os.makedirs(root, exist_ok=True)
  if not os.path.isdir(src):
    subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--no-binary', ':all:',
                    f'llama-cpp-python=={VERSION}', '-d', root], check=True)
    with tarfile.open(glob.glob(os.path.join(root, f'llama_cpp_python-{VERSION}.tar.gz'))[0]) as t:
      t.extractall(root, filter='data')
  cpp = os.path.join(src, 'vendor', 'llama.cpp')
  logging.info('building llama.cpp in %s (a few minutes)', cpp)
  subprocess.run(['cmake', '-S', cpp, '-B', os.path.join(cpp, 'build-portable'), '-DGGML_NATIVE=OFF',
                  '-DLLAMA_CURL=OFF', '-DLLAMA_BUILD_TESTS=OFF', '-DCMAKE_BUILD_TYPE=Release'],
                 check=True, stdout=subprocess.DEVNULL)
  subprocess.run(['cmake', '--build', os.path.join(cpp, 'build-portable'), '--target', 'llama', 'llama-bench',
                  f'-j{os.cpu_count() or 2}'], check=True, stdout=subprocess.DEVNULL)
  return src


def binding(src: str):
  """The `llama_cpp` package of the source tree, on its own built libraries."""
  os.environ['LLAMA_CPP_LIB_PATH'] = os.path.join(src, 'vendor', 'llama.cpp', 'build-portable', 'bin')
  if src not in sys.path:
    sys.path.insert(0, src)
  return importlib.import_module('llama_cpp')


def bench_binary(src: str | None) -> str | None:
  """llama-bench of the build, else one on PATH."""
  if src:
    path = os.path.join(src, 'vendor', 'llama.cpp', 'build-portable', 'bin', 'llama-bench')
    if os.path.exists(path):
      return path
  return shutil.which('llama-bench')


def log_perplexity(llama_cpp, path: str, windows: list[np.ndarray], n_threads: int = 2) -> float:
  """Mean NLL (nats/token) llama.cpp gives the windows (each [seq_len + 1] token ids, as
  `pipeline.eval_batches` rows: the model reads w[:-1] and predicts w[1:]), from its F32 logits."""
  n = max(len(w) for w in windows)
  llm = llama_cpp.Llama(path, n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True, n_threads=n_threads,
                        verbose=False)
  total, count = 0.0, 0
  for w in windows:
    w = [int(t) for t in w]
    llm.reset()
    llm.eval(w[:-1])
    logits = np.asarray(llm.scores[:len(w) - 1], np.float64)
    top = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    total += float(np.sum(logz - logits[np.arange(len(w) - 1), w[1:]]))
    count += len(w) - 1
  llm.close()
  return total / count


def decode_speed(binary: str, path: str, new_tokens: int = 32, threads: int = 2) -> float:
  """llama.cpp's batch-1 decode tok/s of one GGUF file (llama-bench's own JSON report)."""
  out = subprocess.run([binary, '-m', path, '-p', '0', '-n', str(new_tokens), '-t', str(threads),
                        '-o', 'json'], capture_output=True, text=True, check=True).stdout
  return float(next(r['avg_ts'] for r in json.loads(out) if r.get('n_gen', 0) > 0))
