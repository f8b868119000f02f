# Secure MQTT stack. `just --list` shows the recipes; each runs from the repository root.

# Create the development PKI in certs/ (CA, broker, publisher, subscriber)
certs *ARGS:
    cargo run --release -p broker -- certs {{ARGS}}

# Run the broker on 8883 with broker.toml (creates certificates on first run)
broker:
    cargo run --release -p broker

# Run the publisher: an article every 5 s to articulos/<newspaper>/<section>
pub *ARGS:
    cargo run --release -p clients --bin publisher -- {{ARGS}}

# Run the subscriber: prints the articles of articulos/+/futbol
sub *ARGS:
    cargo run --release -p clients --bin subscriber -- {{ARGS}}

# Read the subscriber's archive: `just archive list --section futbol`, `just archive stats`
archive *ARGS:
    cargo run --release -p clients --bin subscriber -- archive {{ARGS}}

# Run broker, publisher and subscriber in one process (Ctrl-C stops all three)
up:
    cargo run --release

# Formatting, lints and every test, as CI runs them
test:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo test --workspace

# Benchmarks against Mosquitto (release build, ~12 min; `just bench --quick` for a short pass): writes docs/BENCHMARKS.md
bench *ARGS:
    cargo build --release -p broker -p bench
    ulimit -n 20000 2>/dev/null; target/release/bench all --write docs/BENCHMARKS.md {{ARGS}}

# Soak against our broker: churn, takeovers, wills, QoS 0/1/2, a SIGKILL halfway; exits 1 on a lost message or growth (docs/BENCHMARKS.md, Soak)
soak MINUTES="30":
    cargo build --release -p broker -p bench
    ulimit -n 20000 2>/dev/null; {{target_dir}}/release/bench soak --minutes {{MINUTES}}

# Where cargo builds (CARGO_TARGET_DIR is honoured); the container engine (ENGINE=docker)
target_dir := env("CARGO_TARGET_DIR", "target")
engine := env("ENGINE", "podman")
image_name := "localhost/mqtt-stack:latest"

# Statically linked broker, publisher and subscriber, staged in dist/ for the image
static:
    RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked --target x86_64-unknown-linux-gnu -p broker -p clients --bin broker --bin publisher --bin subscriber
    rm -rf dist
    mkdir -p dist/bin dist/state/certs dist/state/data dist/state/logs dist/state/archive
    cp {{target_dir}}/x86_64-unknown-linux-gnu/release/broker {{target_dir}}/x86_64-unknown-linux-gnu/release/publisher {{target_dir}}/x86_64-unknown-linux-gnu/release/subscriber dist/bin/

# The image localhost/mqtt-stack:latest (FROM scratch over `just static`), with podman or ENGINE=docker
image: static
    {{ if engine == "podman" { "podman build --format docker" } else { engine + " build" } }} -t {{image_name}} .

# Install podman, runc, podman-compose and mosquitto-clients for the container test (Debian, root)
container-deps:
    bash deploy/container-deps.sh

# The Compose stack under podman, checked end to end (under a minute once `just static` is warm; README, Containers)
container-test: container-deps image
    bash deploy/container-test.sh

# The systemd unit as systemd reads it (systemd-analyze verify and security)
unit-check:
    cargo test -p broker --test broker deploy::systemd -- --nocapture

# Run a fuzz target (fuzz/, cargo-fuzz on stable through RUSTC_BOOTSTRAP) for SECONDS: `just fuzz packet_v5 600`
fuzz TARGET SECONDS:
    RUSTC_BOOTSTRAP=1 cargo fuzz run {{TARGET}} -- -max_total_time={{SECONDS}}
