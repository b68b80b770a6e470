#!/usr/bin/env bash
# Plain curl through the sidecar: a chat call, then where the session lives.
#   SIDECAR_URL=http://127.0.0.1:7878 ADMIN_URL=http://127.0.0.1:7879 bash examples/curl.sh
set -euo pipefail
SIDECAR_URL=${SIDECAR_URL:-http://127.0.0.1:7878}
ADMIN_URL=${ADMIN_URL:-http://127.0.0.1:7879}
MODEL=${MODEL:-llama-3.1-8b-instruct}

curl -sS --fail-with-body -D - "$SIDECAR_URL/v1/chat/completions" \
  -H 'content-type: application/json' -H 'x-session-id: curl-example' \
  -d "{\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}"
echo
curl -sS --fail-with-body "$ADMIN_URL/sessions/curl-example"
echo
