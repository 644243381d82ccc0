#!/usr/bin/env bash
# Wheels an air-gapped GPU node needs to run tad_torchtune (and benchmarks/gpu/check.py) on top of what it has.
#
# The node (issue 17): CPython 3.12, torch 2.11 (CUDA 13), transformers, triton, safetensors, sentencepiece,
# tokenizers, pandas (with their own dependencies: numpy, pyyaml, regex, huggingface_hub, fsspec, tqdm...).
# It lacks torchtune, torchao, omegaconf, torchdata and datasets; this script downloads exactly those and the
# dependencies that `import tad_torchtune, torchtune` and the check script reach, --no-deps, binary wheels only,
# into a git-ignored folder (at most 64 MiB). lm-eval is left out: `tad-tune eval` is not part of the check, and
# lm-eval with its dependencies (evaluate, sacrebleu, rouge, nltk, scikit-learn...) is over 60 MiB on its own.
#
# On a machine with registry access:
#   benchmarks/gpu/bundle.sh                 # -> .whl/ for CPython 3.12 manylinux x86-64
#   PY=3.11 benchmarks/gpu/bundle.sh .whl311 # the same set for another Python (the CPU proof uses 3.11)
# On the node (from the repository root), the one install line and the path:
#   pip install --no-index --no-deps --target .whl/site .whl/*.whl && export PYTHONPATH=$PWD:$PWD/.whl/site
#   python benchmarks/gpu/check.py
set -euo pipefail
PY="${PY:-3.12}"
DEST="${1:-.whl}"
MAX_MIB=64

# Pure-Python wheels (py3-none-any): the same file for every Python and platform.
PURE=(
  torchtune==0.6.1
  omegaconf==2.4.0
  torchdata==0.11.0
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19   # a py3XX-none-any wheel per Python version, still pure Python
)
# Not bundled, measured not needed for `import tad_torchtune, torchtune`, the recipe module or the check (each
# left out in turn over a plain environment): torchtune's download helpers' kagglehub, blobfile and requests.
# Binary wheels, one per Python version. Why each is safe beside the node's torch 2.11: none links to torch
# except torchao, whose C++ extensions are built for one torch version; torchao checks the version at import
# and, on a mismatch, skips loading them ("Skipping import of cpp extensions") and uses its Python paths.
# The loss, recipe and check never call a torchao kernel (AdamW8bit is opt-in via the config).
BINARY=(
  torchao==0.15.0     # cp39-abi3 (stable ABI: one wheel for every CPython >= 3.9)
  xxhash==4.1.0       # datasets' fingerprints; plain C, no torch
  psutil==7.2.2       # torchtune's memory logging; plain C, no torch
  tiktoken==0.14.0    # torchtune's tokenizer module imports it; Rust, no torch
  pyarrow==26.0.1     # datasets' storage (the biggest wheel, ~40 MiB); C++, no torch
)

mkdir -p "$DEST"
common=(--no-deps --only-binary=:all: --python-version "$PY" --implementation cp -d "$DEST")
pip download "${common[@]}" "${PURE[@]}"
pip download "${common[@]}" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 "${BINARY[@]}"

size=$(du -sb "$DEST" --exclude=site | cut -f1)
echo "bundle: $(ls "$DEST"/*.whl | wc -l) wheels, $((size / 1048576)) MiB in $DEST"
if (( size > MAX_MIB * 1048576 )); then
  echo "error: the bundle is over $MAX_MIB MiB; drop a package or move it to the node image" >&2
  exit 1
fi
