#!/usr/bin/env bash
# The op bindings (csrc/bindings) reach torch only through the LibTorch stable ABI, so that
# one build loads into every torch >= its target (csrc/bindings/README.md): they may
# include torch/csrc/stable/* and torch/headeronly/* and nothing else of torch, in
# particular no ATen/*, c10/* (c10/cuda/* included), torch/library.h or torch/extension.h.
# Run by `make lint` (and so by CI). Exit 1 and list the offending lines if any.
set -euo pipefail
cd "$(dirname "$0")/.."
bad=$(grep -nE '^\s*#\s*include\s*[<"](ATen|c10|caffe2)/|^\s*#\s*include\s*[<"]torch/' csrc/bindings \
        -r --include='*.h' --include='*.cpp' --include='*.cu' --include='*.cuh' --include='*.inl' \
      | grep -vE '#\s*include\s*[<"]torch/(csrc/stable|headeronly)/' || true)
if [ -n "$bad" ]; then
  echo "csrc/bindings must use torch only through the stable ABI (torch/csrc/stable, torch/headeronly):" >&2
  echo "$bad" >&2
  exit 1
fi
echo "stable ABI check: csrc/bindings includes only torch/csrc/stable and torch/headeronly"
