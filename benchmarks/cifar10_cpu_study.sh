#!/usr/bin/env bash
# The CIFAR-10 CPU study (docs/RESULTS.md): teacher -> student -> samples -> FID and agreement,
# on the cifar10-cpu preset. Resumable: re-run the same command after a kill and it continues.
#   bash benchmarks/cifar10_cpu_study.sh [--study-dir DIR] [--data ZIP] [--samples N]
#                                        [--no-ablations] [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/cifar10_cpu_study.py "$@"
