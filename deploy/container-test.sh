#!/usr/bin/env bash
# `just container-test`: the Compose stack under podman, end to end, offline. Expects the
# image (`just image`) and the tools (`just container-deps`). Asserts that
#   - broker, publisher and subscriber run read-only, as a non-root user, with restart
#     policies, and the broker's healthcheck (`broker health`, no shell) passes;
#   - the subscriber's container logs a football article;
#   - mosquitto_sub on the host, with the generated certificates, receives one through
#     the published port, and a client without a certificate is refused;
#   - a killed broker is restarted by its policy, its retained message kept;
#   - a retained message and the PKI survive `down` and `up`;
#   - `down -v` leaves no container, pod, volume or network behind.
# Ports and names are its own (MQTT_PORT, METRICS_PORT, PROJECT), so a stack on the
# defaults can run beside it. Output goes to files, not pipes: an orphaned
# `podman start -a` can hold a pipe open and hang the script.
set -euo pipefail
cd "$(dirname "$0")/.."

export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/deploy/podman/containers.conf}"
export MQTT_PORT="${MQTT_PORT:-18883}" METRICS_PORT="${METRICS_PORT:-19883}"
export PUBLISH_INTERVAL=1
PROJECT="${PROJECT:-mqttstacktest}"
IMAGE=localhost/mqtt-stack:latest
SERVICES=(broker publisher subscriber)
WORK="$(mktemp -d)"
LOG="$WORK/compose.log"
started=$SECONDS
passed=0

compose() {
  # podman-compose before 1.1 knows no profiles: name the services (monitoring has
  # images that cannot be pulled here).
  podman-compose -p "$PROJECT" -f compose.yaml "$@" >>"$LOG" 2>&1
}
fail() {
  echo "FAILED: $*" >&2
  echo "--- compose log ($LOG) ---" >&2
  tail -n 40 "$LOG" >&2 || true
  for s in "${SERVICES[@]}"; do
    local c
    c="$(container "$s")"
    [ -n "$c" ] && { echo "--- logs of $s ---" >&2; podman logs --tail 20 "$c" >&2 2>&1 || true; }
  done
  exit 1
}
ok() {
  passed=$((passed + 1))
  echo "ok: $*"
}
container() {
  podman ps -a --filter "label=io.podman.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -n 1
}
leftovers() {
  {
    podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format 'container {{.Names}}'
    podman pod ps --filter "name=$PROJECT" --format 'pod {{.Name}}'
    podman volume ls --format 'volume {{.Name}}' | grep " ${PROJECT}_" || true
    podman network ls --format 'network {{.Name}}' | grep " ${PROJECT}_" || true
  } 2>/dev/null
}
teardown() {
  compose down -v || true
  # podman-compose leaves the project's network behind.
  podman network rm -f "${PROJECT}_default" >>"$LOG" 2>&1 || true
}
cleanup() {
  teardown
  rm -rf "$WORK"
}
trap cleanup EXIT

# Waits up to $1 seconds for the command after it to succeed.
within() {
  local limit=$1
  shift
  local until=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $until ] || return 1
    sleep 1
  done
}
healthy() { podman healthcheck run "$(container broker)"; }
football_logged() { podman logs "$(container subscriber)" 2>&1 | grep -qE '^\[[^]]+/futbol\] '; }
sub() {
  mosquitto_sub -h localhost -p "$MQTT_PORT" --cafile "$WORK/certs/ca.crt" \
    --cert "$WORK/certs/subscriber.crt" --key "$WORK/certs/subscriber.key" "$@"
}
up() {
  compose up -d "${SERVICES[@]}" || fail "podman-compose up"
  for s in "${SERVICES[@]}"; do
    [ -n "$(container "$s")" ] || fail "no container for $s"
  done
  within 60 healthy || fail "broker not healthy within 60 s"
}

podman image exists "$IMAGE" || fail "no image $IMAGE: run \`just image\`"
teardown # what an interrupted run may have left
[ -z "$(leftovers)" ] || fail "left from before: $(leftovers)"

up
# The same check where no broker runs (the publisher's container) must fail, or the one
# above proved nothing.
if podman exec "$(container publisher)" broker health >/dev/null 2>&1; then
  fail "broker health passes without a broker"
fi
ok "stack up: broker healthy; \`broker health\` fails where no broker runs"
for s in "${SERVICES[@]}"; do
  c="$(container "$s")"
  got="$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}} {{.Config.User}} {{.HostConfig.RestartPolicy.Name}}' "$c")"
  [ "$got" = "true 10001:10001 unless-stopped" ] || fail "$s: read-only, user, restart = $got"
done
ok "read-only root, user 10001, restart unless-stopped"

within 60 football_logged || fail "the subscriber logged no football article within 60 s"
ok "subscriber container: $(podman logs "$(container subscriber)" 2>&1 | grep -E '^\[[^]]+/futbol\] ' | head -n 1 | cut -c1-70)"
archived() { podman exec "$(container subscriber)" subscriber archive stats --archive sqlite:archive/articles.db 2>/dev/null | grep -q futbol; }
within 60 archived || fail "the subscriber's archive holds no football article"
ok "subscriber archive (SQLite in the archive volume) holds football articles"

podman cp "$(container broker):/mqtt/certs" "$WORK/certs" || fail "copy the PKI out"
got="$(sub -t 'articulos/+/futbol' -C 1 -W 30 -v -i container-test-host)" || fail "host mosquitto_sub received nothing"
ok "host mosquitto_sub on :$MQTT_PORT: $(echo "$got" | cut -c1-60)"

if mosquitto_sub -h localhost -p "$MQTT_PORT" --cafile "$WORK/certs/ca.crt" \
  -t 'articulos/#' -C 1 -W 5 -i container-test-nocert >"$WORK/nocert" 2>&1; then
  fail "a client without a certificate was served"
fi
podman logs "$(container broker)" 2>&1 | grep -q "no client certificate" ||
  fail "the broker did not log the refusal"
ok "client without a certificate refused (and logged)"

if curl_out="$(exec 3<>"/dev/tcp/127.0.0.1/$METRICS_PORT" && printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3 && cat <&3)"; then
  grep -q '^broker_connections_open' <<<"$curl_out" || fail "no broker metrics on 127.0.0.1:$METRICS_PORT"
  ok "metrics on the host's loopback :$METRICS_PORT"
else
  fail "no metrics endpoint on 127.0.0.1:$METRICS_PORT"
fi

payload="retained $(date +%s%N)"
mosquitto_pub -h localhost -p "$MQTT_PORT" --cafile "$WORK/certs/ca.crt" \
  --cert "$WORK/certs/publisher.crt" --key "$WORK/certs/publisher.key" \
  -t articulos/container-test/retained -m "$payload" -r -q 1 -i container-test-pub ||
  fail "mosquitto_pub of the retained message"
cp "$WORK/certs/ca.crt" "$WORK/ca-before.crt"

# A crash (SIGKILL from outside, not `podman stop`): the restart policy brings the broker
# back, and the acknowledged retained message is on disk.
kill -KILL "$(podman inspect --format '{{.State.Pid}}' "$(container broker)")"
restarted() { [ "$(podman inspect --format '{{.RestartCount}}' "$(container broker)")" -ge 1 ] && healthy; }
within 60 restarted || fail "the broker was not restarted after a crash"
got="$(sub -t articulos/container-test/retained -C 1 -W 20 -i container-test-crash)" ||
  fail "no retained message after the crash"
[ "$got" = "$payload" ] || fail "retained after the crash: got '$got', want '$payload'"
ok "broker killed: restarted by its policy, retained message kept"

compose down || fail "podman-compose down"
[ -z "$(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" -q)" ] ||
  fail "containers left after down"
up
got="$(sub -t articulos/container-test/retained -C 1 -W 20 -i container-test-retained)" ||
  fail "the retained message did not survive down and up"
[ "$got" = "$payload" ] || fail "retained after down/up: got '$got', want '$payload'"
podman cp "$(container broker):/mqtt/certs/ca.crt" "$WORK/ca-after.crt"
cmp -s "$WORK/ca-before.crt" "$WORK/ca-after.crt" || fail "the PKI was created anew"
ok "retained message and PKI survived down and up"

teardown
[ -z "$(leftovers)" ] || fail "down -v left: $(leftovers)"
ok "down -v left nothing behind"

echo "container-test: $passed passed, 0 failed in $((SECONDS - started)) s"
