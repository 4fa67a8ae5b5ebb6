# Shared by scripts/demo and scripts/test: install what is missing, then configure and build.
# Sourced, not run.

# Debian 12 packages weir needs to build its tests, examples and benchmarks, with g++ and with
# clang 14 (the clang preset, which needs clang's sanitizer runtimes).
WEIR_PACKAGES=(g++ clang-14 libclang-rt-14-dev cmake ninja-build pkg-config libboost1.81-dev catch2
  libfmt-dev libbenchmark-dev libssl-dev libhiredis-dev libcurl4-openssl-dev redis-server
  nginx-light haproxy python3-flask-limiter)

weir_missing_packages() {
  local missing=() p
  for p in "${WEIR_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  echo "${missing[@]}"
}

# Installs only the missing packages; quiet when everything is there.
weir_ensure_packages() {
  local missing
  missing=$(weir_missing_packages)
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "weir needs these Debian packages, which are not installed: $missing" >&2
    echo "Install them as root:  apt-get install -y $missing" >&2
    exit 1
  fi
  echo "Installing: $missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

# The official SDKs that weir-gateway's real-client test drives it with ("[sdk]" in
# tests/gateway_test.cpp), pinned, installed from the npm registry into build/npm. Node.js comes
# with the machine, or from Debian's nodejs and npm.
WEIR_NPM_PACKAGES=(openai@6.49.0 @anthropic-ai/sdk@1.17.0)

weir_ensure_npm_packages() {
  local dir=build/npm stamp
  stamp="${WEIR_NPM_PACKAGES[*]}"
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    local WEIR_PACKAGES=(nodejs npm)
    weir_ensure_packages
  fi
  [ -f "$dir/installed" ] && [ "$(cat "$dir/installed")" = "$stamp" ] && return 0
  mkdir -p "$dir"
  echo '{"private": true}' >"$dir/package.json"
  npm install --prefix "$dir" --no-audit --no-fund --silent "${WEIR_NPM_PACKAGES[@]}"
  echo "$stamp" >"$dir/installed"
}

# The Prometheus server that tests/prometheus_test.cpp runs ("[prometheus]"): Debian's prometheus
# package, unpacked into build/prometheus rather than installed. Installed, it would pull in 218 MB
# of JavaScript for its web UI (libjs-moment-timezone alone) and start a system service; the test
# needs the one program (50 MB, a 19 MB download).
weir_ensure_prometheus() {
  local dir=build/prometheus deb
  [ -x "$dir/usr/bin/prometheus" ] && return 0
  mkdir -p "$dir"
  (cd "$dir" && { apt-get download -qq prometheus 2>/dev/null || {
    apt-get update -qq && apt-get download -qq prometheus; }; })
  deb=$(ls "$dir"/prometheus_*.deb)
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$dir" ./usr/bin/prometheus
  rm -f "$deb"
}

# Configures and builds one CMake preset with two jobs; extra arguments go to the build
# (e.g. --target weir-demo).
weir_build() {
  local preset=$1
  shift
  cmake --preset "$preset" >/dev/null
  cmake --build --preset "$preset" "$@"
}
