#!/bin/sh
# Entrypoint of the hybridserve image run on its own (docker run): a one-node Ray cluster whose
# Prometheus metrics are on a fixed port, then `hybridserve serve` on it.
# On Kubernetes the KubeRay operator starts Ray itself and deploys serveConfigV2: this is not used.
#   RAY_NUM_CPUS                logical CPUs Ray schedules replicas on (replicas set their own torch threads)
#   RAY_METRICS_EXPORT_PORT     Prometheus endpoint of Ray's metrics agent (8080)
#   HYBRIDSERVE_REPOSITORY      the model repository (/models: the built-in models, or a mounted folder)
set -eu
ray start --head --disable-usage-stats --include-dashboard=false \
    --num-cpus="${RAY_NUM_CPUS:-16}" --metrics-export-port="${RAY_METRICS_EXPORT_PORT:-8080}" >/dev/null
exec hybridserve serve --address=auto --repository="${HYBRIDSERVE_REPOSITORY}" "$@"
