# The fleet monitor: probes every model pod's /health (and /metrics, for pools with a
# metrics_path) once per interval for the whole fleet and publishes each pool's pod view in
# Redis; every sidecar follows it instead of probing the pods itself. Two instances are
# safe: one leads through a Redis lock (llmsc:monitor:leader), the other takes over if it
# dies. With no monitor running, or its view stale, each sidecar probes by itself.
#
# GPU readings: for the pools that name their "nomad_service", the leader also reads each
# pod's allocation statistics from Nomad (NVIDIA utilization and memory) into the view.
# It needs a Nomad ACL token whose policy grants read-job in the pool jobs' namespace
# (namespace "default" { capabilities = ["read-job"] }: reading service registrations and
# allocation statistics needs nothing else), kept with the Nomad CA in Nomad Variables at
# nomad/jobs/llm-monitor (keys read_token and nomad_ca_pem), never in this file.

variable "sidecar_image" {
  type    = string
  default = "ghcr.io/llm-sidecar/llm-sidecar:0.1.0"
}

variable "redis_url" {
  type    = string
  default = "redis://redis.internal:6379/0"
}

job "llm-monitor" {
  type = "service"

  group "monitor" {
    count = 2

    # The two instances on different hosts, so one host failing leaves a leader.
    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    # GET /health for Nomad's check, GET /stats (leading, probes, view writes, notices).
    network {
      port "stats" {
        to = 7881
      }
    }

    service {
      name     = "llm-monitor"
      provider = "nomad"
      port     = "stats"

      check {
        type     = "http"
        path     = "/health"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "monitor" {
      driver = "docker"

      config {
        image = var.sidecar_image
        args  = ["monitor", "--stats-listen", "0.0.0.0:7881"]
        ports = ["stats"]
      }

      # The same pools as the sidecars' (nomad/sidecar.hcl): a sidecar follows the view
      # only for the endpoints it carries, and probes any other one itself. Re-rendered
      # when pods come or go; SIGHUP re-reads it.
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

      # The token that reads service registrations and allocation statistics (read-job),
      # from Nomad Variables; the same NOMAD_* variables as the scaler's.
      template {
        destination = "${NOMAD_SECRETS_DIR}/nomad.env"
        env         = true
        data        = <<-EOT
        NOMAD_TOKEN={{ with nomadVar "nomad/jobs/llm-monitor" }}{{ .read_token }}{{ end }}
        EOT
      }

      # The CA that signed the Nomad servers' certificate (NOMAD_ADDR is https://).
      template {
        destination = "${NOMAD_SECRETS_DIR}/nomad-ca.pem"
        data        = <<-EOT
        {{ with nomadVar "nomad/jobs/llm-monitor" }}{{ .nomad_ca_pem }}{{ end }}
        EOT
      }

      env {
        SIDECAR_POOLS_FILE = "${NOMAD_TASK_DIR}/pools.json"
        SIDECAR_REDIS_URL  = var.redis_url
        NOMAD_ADDR         = "https://nomad.service.internal:4646"
        NOMAD_CACERT       = "${NOMAD_SECRETS_DIR}/nomad-ca.pem"
        # The pool jobs (model-pool*.hcl) run in the default namespace.
        NOMAD_NAMESPACE    = "default"
        DD_SERVICE         = "llm-monitor"
        # Events to the node's Datadog agent (see sidecar.hcl).
        DD_AGENT_HOST     = "${attr.unique.network.ip-address}"
        DD_DOGSTATSD_PORT = "8125"
      }

      resources {
        cpu    = 100
        memory = 128
      }
    }
  }
}
