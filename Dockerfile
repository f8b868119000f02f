# The broker, publisher and subscriber in an image of their own files only: no shell, no
# libc, no package manager. The binaries are statically linked on the host first, so the
# image builds with no base image to pull and no RUN step: `just image` does both steps
# (or `just static`, then `docker build .` / `podman build --format docker .`).
FROM scratch

COPY dist/bin/broker dist/bin/publisher dist/bin/subscriber /usr/local/bin/
# Relative paths in broker.toml resolve against its folder, and the clients' defaults
# (certs/ca.crt, certs/<identity>.crt) against the working directory: both are /mqtt.
COPY broker.toml /mqtt/broker.toml
# Empty certs/, data/ and logs/ owned by the user: a named volume mounted on one starts
# with this owner, so the broker can write there with a read-only root filesystem.
COPY --chown=10001:10001 dist/state/ /mqtt/

WORKDIR /mqtt
ENV PATH=/usr/local/bin \
    BROKER__METRICS__BIND=0.0.0.0:9883
USER 10001:10001
EXPOSE 8883 9883
# Exec form, since there is no shell. Here rather than in compose.yaml: podman-compose
# wraps a Compose healthcheck in /bin/sh. Podman keeps it with `--format docker`.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["broker", "health", "--timeout", "3"]
CMD ["broker"]
