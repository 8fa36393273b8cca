#!/usr/bin/env bash
# Run a rendered compose project to the end and exit with the chief's exit code.
#
#   deploy/run-compose.sh [-p PROJECT] [COMPOSE_FILE]     (default deploy/docker-compose.yml)
#
# Like `docker compose up --exit-code-from chief`, except that only the chief ends the run:
# `--exit-code-from` implies `--abort-on-container-exit`, which stops everything as soon as any
# container exits, even a worker or shard that `restart: on-failure` would bring back, or a
# worker that finishes a moment before the chief. Here the project starts detached, its logs are
# followed, `docker wait` waits for the chief, and then the containers are stopped and removed;
# the named volumes (runs, cache) are kept.
set -euo pipefail

project=()
if [[ "${1:-}" == "-p" ]]; then project=(-p "$2"); shift 2; fi
file="${1:-$(dirname "$0")/docker-compose.yml}"
[[ -f "$file" ]] || { echo "run-compose.sh: error: $file: no such compose file" >&2; exit 2; }
if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
compose+=("${project[@]}" -f "$file")

code_file="$(mktemp)"
logs=""
trap 'set +e; "${compose[@]}" down -t 10 >/dev/null 2>&1; [[ -z "$logs" ]] || kill "$logs" 2>/dev/null; rm -f "$code_file"' EXIT
trap 'exit 130' INT TERM
"${compose[@]}" up -d
chief="$("${compose[@]}" ps -q chief)"
[[ -n "$chief" ]] || { echo "run-compose.sh: error: $file has no running chief service" >&2; exit 2; }
"${compose[@]}" logs -f --no-color & logs=$!
# In the background, so that Ctrl-C or a TERM interrupts `wait` at once and the trap cleans up.
docker wait "$chief" >"$code_file" & wait $!
code="$(cat "$code_file")"
echo "run-compose.sh: the chief exited with code $code"
exit "$code"
