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
