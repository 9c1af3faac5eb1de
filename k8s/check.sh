#!/usr/bin/env bash
# Offline checks of everything under k8s/, no cluster needed:
#   1. every kustomize target renders (kubectl kustomize);
#   2. the output is valid against the Kubernetes 1.32 OpenAPI schemas, strictly
#      (kubernetes-validate), and custom resources against their CRD schemas (tools/);
#   3. invariants a zero-loss, locked-down deployment depends on (tools/invariants.py);
#   4. the front door's nginx config is the same proxy config as nginx/, and both pass `nginx -t`;
#   5. the hub Dockerfile's build stage builds from what its COPY lines bring in
#      (`--skip-image-build` leaves it out).
# Needs kubectl, python3 with kubernetes-validate, node with npm, nginx; scripts/test-all.sh
# installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

build_image_step=1
[ "${1:-}" = "--skip-image-build" ] && build_image_step=0

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0
step() {
  local name=$1
  shift
  if "$@" >"$work/step.log" 2>&1; then
    passed=$((passed + 1))
    echo "ok   $name"
  else
    failed=$((failed + 1))
    echo "FAIL $name"
    sed 's/^/     /' "$work/step.log"
  fi
}

# kubectl needs no cluster to render, but must not look for one.
export KUBECONFIG=/dev/null

(cd k8s/tools && { [ -d node_modules ] || npm ci --silent --no-audit --no-fund; })

targets=(overlays/dev overlays/production overlays/production-cluster examples/gateway-api examples/ingress-nginx)
for target in "${targets[@]}"; do
  out="$work/$(echo "$target" | tr / -).yaml"
  step "$target renders" sh -c "kubectl kustomize k8s/$target > $out"
  [ -s "$out" ] || continue
  step "$target matches the Kubernetes 1.32 schemas (strict)" \
    python3 -m kubernetes_validate -k 1.32 --strict --quiet "$out"
  step "$target custom resources match their CRD schemas" node k8s/tools/validate-crds.mjs "$out"
  step "$target invariants" python3 k8s/tools/invariants.py "$target" "$out" \
    k8s/base/hub/hub.toml k8s/base/front-door/hub-proxy.conf
done

step "k8s front door proxies like nginx/hub-proxy.conf" \
  cmp nginx/hub-proxy.conf k8s/base/front-door/hub-proxy.conf

# nginx -t of the rendered front-door ConfigMap. The cluster's name server and hub names do not
# resolve here, so they become loopback; nginx before 1.27.3 (Debian 12 has 1.22) rejects
# `resolve`, so it is dropped there and kept where the local nginx knows it.
nginx_t() {
  local conf="$work/front-door"
  mkdir -p "$conf"
  python3 - "$work/overlays-dev.yaml" "$conf" <<'EOF'
import pathlib, sys, yaml
for o in yaml.safe_load_all(open(sys.argv[1])):
    if o and o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("front-door-nginx"):
        for name, text in o["data"].items():
            pathlib.Path(sys.argv[2], name).write_text(text)
EOF
  local version
  version=$(nginx -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
  sed -i "s|resolver [^;]*;|resolver 127.0.0.1;|" "$conf/nginx.conf"
  sed -i "s|server [^ ]*:8080|server 127.0.0.1:8080|" "$conf/hub-upstreams.conf"
  if [ "$(printf '%s\n1.27.3\n' "$version" | sort -V | head -1)" != "1.27.3" ]; then
    echo "nginx $version predates 'resolve': checking without it"
    sed -i "s| resolve||" "$conf/hub-upstreams.conf"
  fi
  sed -i "s|pid /tmp/nginx.pid;|pid $work/nginx.pid;|" "$conf/nginx.conf"
  nginx -t -p "$conf" -c "$conf/nginx.conf" -e stderr
}
step "k8s front-door nginx.conf passes nginx -t" nginx_t

# The same for nginx/ as shipped (its hub names made loopback).
nginx_t_shipped() {
  local conf="$work/nginx"
  mkdir -p "$conf"
  cp nginx/*.conf "$conf/"
  sed -i "s|server [^ ]*:8080|server 127.0.0.1:8080|" "$conf/hub-upstreams.conf"
  sed -i "s|^pid .*;|pid $work/nginx-shipped.pid;|" "$conf/nginx.conf"
  nginx -t -p "$conf" -c "$conf/nginx.conf" -e stderr
}
step "nginx/nginx.conf passes nginx -t" nginx_t_shipped

if [ "$build_image_step" = 1 ]; then
  # The Dockerfile's build stage as written: only what its COPY lines bring into the context
  # (minus .dockerignore's target/ and node_modules), then its own cargo build line.
  image_build() {
    local context="$work/context"
    mkdir -p "$context"
    sed -n 's/^COPY \([^-][^ ]*\( [^ ]*\)*\) \([^ ]*\)$/\1/p' services/hub/Dockerfile |
      tr ' ' '\n' | while read -r path; do
        [ -n "$path" ] && cp -r "$path" "$context/"
      done
    rm -rf "$context/target"
    find "$context" -name node_modules -prune -exec rm -rf {} +
    local build
    build=$(sed -n 's/^RUN \(cargo build .*\)$/\1/p' services/hub/Dockerfile)
    echo "in the build context: $(ls "$context" | tr '\n' ' ')"
    (cd "$context" && CARGO_TARGET_DIR="$OLDPWD/target" sh -c "$build") &&
      target/release/hub probe --help >/dev/null
  }
  step "hub Dockerfile build stage (COPY lines, then its cargo build)" image_build
fi

echo "k8s checks: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
