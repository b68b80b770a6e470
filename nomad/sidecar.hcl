# An app with llm-sidecar next to it. The app calls http://127.0.0.1:7878/v1 as if it were
# the model server; the sidecar routes each session to a warm pod of the right pool.
#
# Both tasks share the group's bridge network namespace, so 127.0.0.1 is the same place
# for both and the proxy listener is never reachable from outside the allocation.

variable "sidecar_image" {
  type    = string
  default = "ghcr.io/llm-sidecar/llm-sidecar:0.1.0"
}

variable "redis_url" {
  type        = string
  description = "Route store shared by every sidecar, e.g. redis://redis.service.internal:6379/0"
  default     = "redis://redis.internal:6379/0"
}

job "chat-app" {
  type = "service"

  group "app" {
    count = 2

    network {
      mode = "bridge"
      # Only the admin listener is mapped, for Nomad's health check; the proxy stays on
      # the allocation's loopback.
      port "admin" {
        to = 7879
      }
    }

    service {
      name     = "chat-app-sidecar"
      provider = "nomad"
      port     = "admin"

      check {
        name     = "sidecar-alive"
        type     = "http"
        path     = "/health"
        interval = "10s"
        timeout  = "2s"
      }
    }

    # Nomad starts main tasks once prestart sidecars have *started*, not once they are
    # ready. This short task holds the app back until the sidecar answers, so the app's
    # first call never meets a closed port. It waits for /health (listening), not /ready
    # (a model pod is ready): an app must be able to start while its pools are cold, and
    # the sidecar answers those calls with a clear 503 + Retry-After.
    task "wait-for-sidecar" {
      driver = "docker"

      lifecycle {
        hook    = "prestart"
        sidecar = false
      }

      # The image's ENTRYPOINT is llm-sidecar and the docker driver keeps it: `args` are its
      # arguments (a `command` would be passed to it as one more argument).
      config {
        image = var.sidecar_image
        args  = ["wait", "--url", "http://127.0.0.1:7879/health", "--timeout", "60"]
      }

      resources {
        cpu    = 50
        memory = 64
      }
    }

    task "sidecar" {
      driver = "docker"

      lifecycle {
        hook    = "prestart"
        sidecar = true
      }

      config {
        image = var.sidecar_image
        args  = ["serve"]
      }

      env {
        SIDECAR_LISTEN = "127.0.0.1:7878"
        # 0.0.0.0 inside the allocation's own namespace, so the mapped admin port (and the
        # health check) can reach it; nothing else is published. Off loopback only
        # /health, /ready and /metrics answer without SIDECAR_ADMIN_TOKEN (below).
        SIDECAR_ADMIN_LISTEN     = "0.0.0.0:7879"
        SIDECAR_POOLS_FILE       = "${NOMAD_TASK_DIR}/pools.json"
        SIDECAR_ROUTES           = "{\"low\":{\"small\":16},\"medium\":{\"small\":12,\"large\":4},\"high\":{\"small\":8,\"large\":8}}"
        SIDECAR_REDIS_URL        = var.redis_url
        SIDECAR_REDIS_TIMEOUT_MS = "50"
        SIDECAR_SESSION_HEADER   = "x-session-id"
        SIDECAR_DRAIN_TIMEOUT_S  = "25"
        DD_SERVICE               = "chat-app"
        DD_ENV                   = "prod"
        # DogStatsD goes to the node's Datadog agent: in bridge mode localhost is the
        # allocation's own namespace, so the agent is addressed by the node's IP (the agent
        # listens on 8125/udp with DD_DOGSTATSD_NON_LOCAL_TRAFFIC=true).
        DD_AGENT_HOST     = "${attr.unique.network.ip-address}"
        DD_DOGSTATSD_PORT = "8125"
      }

      # The admin token, from Nomad Variables (the job file holds no secret): /stats,
      # /endpoints and /sessions on the mapped admin port need it, the /health check
      # does not. Create it once:
      #   nomad var put nomad/jobs/chat-app admin_token="$(openssl rand -hex 32)"
      template {
        destination = "${NOMAD_SECRETS_DIR}/admin.env"
        env         = true
        data        = <<-EOT
        SIDECAR_ADMIN_TOKEN={{ with nomadVar "nomad/jobs/chat-app" }}{{ .admin_token }}{{ end }}
        EOT
      }

      # The pools' endpoints come from Nomad's service discovery. When pods come or go the
      # file is re-rendered and the sidecar re-reads it on SIGHUP: new endpoints start
      # warming, removed ones drain, and no connection is dropped.
      template {
        destination   = "${NOMAD_TASK_DIR}/pools.json"
        change_mode   = "signal"
        change_signal = "SIGHUP"
        data          = <<-EOT
        {
          "small": {
            "model": "llama-3.1-8b-instruct",
            "health_path": "/health",
            "cold_start_s": 600,
            "nomad_service": "llm-small",
            "endpoints": [{{ range $i, $s := nomadService "llm-small" }}{{ if $i }}, {{ end }}"http://{{ $s.Address }}:{{ $s.Port }}"{{ end }}]
          },
          "large": {
            "model": "llama-3.1-70b-instruct",
            "health_path": "/health",
            "cold_start_s": 900,
            "fallback": "small",
            "nomad_service": "llm-large",
            "endpoints": [{{ range $i, $s := nomadService "llm-large" }}{{ if $i }}, {{ end }}"http://{{ $s.Address }}:{{ $s.Port }}"{{ end }}]
          }
        }
        EOT
      }

      # Sized for a proxy: it holds routes (a few hundred bytes each) and streams bytes.
      resources {
        cpu        = 250
        memory     = 128
        memory_max = 256
      }

      # SIGTERM starts the drain; give it longer than SIDECAR_DRAIN_TIMEOUT_S.
      kill_timeout = "30s"
      kill_signal  = "SIGTERM"
    }

    task "app" {
      driver = "docker"

      config {
        image = "example/chat-app:latest"
      }

      env {
        OPENAI_BASE_URL = "http://127.0.0.1:7878/v1"
        OPENAI_API_KEY  = "unused-the-sidecar-holds-real-keys"
        # "auto": the sidecar's routing table picks the pool and names its model; naming a
        # pool's model (or alias) instead pins that pool.
        MODEL = "auto"
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }
}
