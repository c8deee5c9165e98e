#!/usr/bin/env bash
# The CIFAR-10 CPU study (docs/RESULTS.md): teacher -> student -> samples -> FID and agreement,
# on the cifar10-cpu preset. Resumable: re-run the same command after a kill and it continues.
#   bash benchmarks/cifar10_cpu_study.sh [--study-dir DIR] [--data PATH] [--samples N]
#                                        [--no-ablations] [--quick] [--workers N]
# PATH (relative to the repository root): the CIFAR-10 training images as an EDM-layout zip or
# torchvision's cifar-10-batches-py folder; read the header of cifar10_cpu_study.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/cifar10_cpu_study.py "$@"
