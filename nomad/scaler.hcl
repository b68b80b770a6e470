# The scaler: reads the traffic every sidecar reports to Redis, asks Nomad for the replica
# counts that cover the demand a cold start ahead, and publishes the load level. Two
# instances are safe: one leads through a Redis lock, the other takes over if it dies.

variable "sidecar_image" {
  type    = string
  default = "ghcr.io/llm-sidecar/llm-sidecar:0.1.0"
}

variable "redis_url" {
  type    = string
  default = "redis://redis.internal:6379/0"
}

job "llm-scaler" {
  type = "service"

  group "scaler" {
    count = 2

    # The two instances on different hosts, so one host failing leaves a leader.
    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    # GET /metrics: the forecast gauges a Prometheus scrapes for the Nomad Autoscaler
    # alternative (see nomad/model-pool.hcl); only the leader publishes them.
    network {
      port "metrics" {
        to = 7880
      }
    }

    service {
      name     = "llm-scaler-metrics"
      provider = "nomad"
      port     = "metrics"
      tags     = ["prometheus"]

      check {
        type     = "http"
        path     = "/health"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "scaler" {
      driver = "docker"

      config {
        image = var.sidecar_image
        args  = ["scaler"]
        ports = ["metrics"]
      }

      # A Nomad ACL token with the scale-job and read-job-scaling capabilities for the
      # pool jobs' namespace, from Nomad Variables (never in the job file).
      template {
        destination = "${NOMAD_SECRETS_DIR}/nomad.env"
        env         = true
        data        = <<-EOT
        NOMAD_TOKEN={{ with nomadVar "nomad/jobs/llm-scaler" }}{{ .scale_token }}{{ end }}
        EOT
      }

      # The CA that signed the Nomad servers' certificate (NOMAD_ADDR is https://).
      template {
        destination = "${NOMAD_SECRETS_DIR}/nomad-ca.pem"
        data        = <<-EOT
        {{ with nomadVar "nomad/jobs/llm-scaler" }}{{ .nomad_ca_pem }}{{ end }}
        EOT
      }

      env {
        SIDECAR_REDIS_URL         = var.redis_url
        SIDECAR_SCALER_INTERVAL_S = "15"
        SIDECAR_SCALER_DRY_RUN    = "0"
        NOMAD_ADDR                = "https://nomad.service.internal:4646"
        NOMAD_CACERT              = "${NOMAD_SECRETS_DIR}/nomad-ca.pem"
        # The pool jobs (model-pool*.hcl) run in the default namespace.
        NOMAD_NAMESPACE           = "default"
        SIDECAR_SCALER_POOLS      = "{\"small\":{\"job\":\"llm-small\",\"group\":\"server\",\"min\":1,\"max\":8,\"replica_tokens_per_s\":2500,\"cold_start_s\":600},\"large\":{\"job\":\"llm-large\",\"group\":\"server\",\"min\":1,\"max\":4,\"replica_tokens_per_s\":900,\"cold_start_s\":900}}"
        DD_SERVICE                = "llm-scaler"
        # Events and metrics to the node's Datadog agent (see sidecar.hcl).
        DD_AGENT_HOST     = "${attr.unique.network.ip-address}"
        DD_DOGSTATSD_PORT = "8125"
        # GET /metrics inside the container, published as the "metrics" port.
        SIDECAR_SCALER_METRICS_LISTEN = "0.0.0.0:7880"
      }

      resources {
        cpu    = 100
        memory = 128
      }
    }
  }
}
