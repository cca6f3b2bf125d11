#!/usr/bin/env bash
# Install step for the age/gender estimator (s2f/agegender.py) and its JavaScript reference.
#
#   .cache/faceapi/model/    age_gender_model-weights_manifest.json + age_gender_model.bin (MIT)
#   .cache/faceapi/samples/  the sample photos the face-api package ships (demo/sample*.jpg)
#   .cache/faceapi/node/     node_modules for s2f/faceapi/run_agegender.mjs (exact versions)
#
# Everything comes from the npm registry through npm itself; nothing is fetched at run time.
# Usage: scripts/fetch-faceapi.sh [--no-node]   (--no-node: weights + samples only)
set -euo pipefail

FACEAPI_VERSION="1.7.15"  # pinned: the architecture in s2f/agegender.py mirrors this release
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache/faceapi"  # git-ignored; s2f/agegender.py and the runner look here
MODEL_FILES=(age_gender_model-weights_manifest.json age_gender_model.bin)

with_node=1
[[ "${1:-}" == "--no-node" ]] && with_node=0

if ! command -v npm >/dev/null; then
  echo "fetch-faceapi: npm not found; install Node.js 20+ (it ships npm)" >&2
  exit 1
fi

mkdir -p "$CACHE"
tmp="$(mktemp -d "$CACHE/.pack.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# npm pack fetches the published tarball without running any install scripts.
(cd "$tmp" && npm pack --silent "@vladmandic/face-api@$FACEAPI_VERSION" >/dev/null)
tar -xzf "$tmp"/vladmandic-face-api-"$FACEAPI_VERSION".tgz -C "$tmp"

mkdir -p "$CACHE/model" "$CACHE/samples"
for f in "${MODEL_FILES[@]}"; do
  cp "$tmp/package/model/$f" "$CACHE/model/$f"
done
cp "$tmp"/package/demo/sample*.jpg "$CACHE/samples/"
cp "$tmp/package/LICENSE" "$CACHE/LICENSE"

if [[ $with_node == 1 ]]; then
  # The runner's package.json pins exact versions; install them next to a copy of it.
  mkdir -p "$CACHE/node"
  cp "$ROOT/s2f/faceapi/package.json" "$CACHE/node/package.json"
  # npm has been seen to leave a package half-unpacked on a first install: check the files the
  # runner loads and install again until they are there.
  needed=(node_modules/@tensorflow/tfjs/dist/tf.node.js
          node_modules/@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm.wasm
          node_modules/@vladmandic/face-api/dist/face-api.node-wasm.js
          node_modules/jpeg-js/index.js)
  complete() { local f; for f in "${needed[@]}"; do [[ -f "$CACHE/node/$f" ]] || return 1; done; }
  for attempt in 1 2 3; do
    (cd "$CACHE/node" && npm install --silent --no-audit --no-fund --ignore-scripts >/dev/null) || true
    complete && break
    echo "fetch-faceapi: npm install left files missing (attempt $attempt); reinstalling from scratch" >&2
    rm -rf "$CACHE/node/node_modules" "$CACHE/node/package-lock.json"
  done
  complete || { echo "fetch-faceapi: npm install failed: missing ${needed[*]}" >&2; exit 1; }
fi

echo "fetch-faceapi: face-api $FACEAPI_VERSION ready in $CACHE"
