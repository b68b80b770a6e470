# An example model pool: vLLM serving one model, registered in Nomad's own service
# discovery so the sidecars' templates find it. The scaler changes `count` of group
# "server" through Nomad's scale API within the `scaling` bounds below.
# model-pool-large.hcl is the same for the large pool (llm-large).
#
# Before the first run: a Hugging Face token for the gated Llama weights in Nomad Variables
# (nomad var put nomad/jobs/llm-small hf_token=hf_…) and a host volume "hf-cache" on the GPU
# nodes (client { host_volume "hf-cache" { path = "/opt/hf-cache" } }) so a restart or a
# new allocation on the same node does not download the weights again.

variable "model" {
  type    = string
  default = "meta-llama/Llama-3.1-8B-Instruct"
}

variable "served_model_name" {
  type    = string
  default = "llama-3.1-8b-instruct"
}

# Pinned: a new vLLM release is a deliberate change, never a side effect of a restart.
variable "vllm_image" {
  type    = string
  default = "vllm/vllm-openai:v0.8.5"
}

job "llm-small" {
  type = "service"

  group "server" {
    count = 2

    # Nomad holds every scale call to min/max, whoever makes it.
    scaling {
      # The policy below is the alternative to the scaler calling Nomad's scale API
      # itself: set enabled = true, run the scaler with SIDECAR_SCALER_DRY_RUN=1 (it then
      # only publishes its forecast) and the stock Nomad Autoscaler acts on this policy.
      # Never both at once. The metric is forecast replicas ÷ the group's current count,
      # so the target-value strategy with target 1 asks for the forecast. Keep min >= 1
      # here: the strategy multiplies the current count.
      enabled = false
      min     = 1
      max     = 8

      policy {
        evaluation_interval = "15s"
        # The scaler already keeps replicas through gaps shorter than a cold start; a long
        # cooldown here would only delay the next scale-out.
        cooldown = "1m"

        check "llm-sidecar-forecast" {
          source       = "prometheus"
          query        = "max(llm_sidecar_scaler_forecast_ratio{pool=\"small\"})"
          query_window = "1m"
          on_error     = "ignore"

          strategy "target-value" {
            target    = 1
            threshold = 0.01
          }
        }

        # With the Datadog APM plugin instead (the scaler's DogStatsD gauge):
        #   source = "datadog"
        #   query  = "max:llm_sidecar.scaler.forecast_ratio{pool:small}"
      }
    }

    network {
      port "http" {
        to = 8000
      }
    }

    volume "hf-cache" {
      type      = "host"
      source    = "hf-cache"
      read_only = false
    }

    service {
      name     = "llm-small"
      provider = "nomad"
      port     = "http"

      # vLLM answers /health with 200 only once the model is loaded; a cold start of a
      # small model takes about 10 minutes, hence the long grace.
      check {
        name     = "vllm-health"
        type     = "http"
        path     = "/health"
        interval = "10s"
        timeout  = "3s"

        check_restart {
          limit = 3
          grace = "15m"
        }
      }
    }

    # A cold start takes ~10 minutes: the healthy deadline allows for it, and Nomad requires
    # it to stay below the progress deadline (default 10m, so it is raised here).
    update {
      max_parallel      = 1
      min_healthy_time  = "30s"
      healthy_deadline  = "20m"
      progress_deadline = "30m"
    }

    migrate {
      max_parallel     = 1
      min_healthy_time = "30s"
      healthy_deadline = "20m"
    }

    task "vllm" {
      driver = "docker"

      config {
        image = var.vllm_image
        ports = ["http"]
        args = [
          "--model", var.model,
          "--served-model-name", var.served_model_name,
          "--port", "8000",
          "--enable-prefix-caching",
        ]
      }

      volume_mount {
        volume      = "hf-cache"
        destination = "/root/.cache/huggingface"
      }

      # The gated weights' token, from Nomad Variables, as an environment variable only.
      template {
        destination = "${NOMAD_SECRETS_DIR}/hf.env"
        env         = true
        data        = <<-EOT
        HF_TOKEN={{ with nomadVar "nomad/jobs/llm-small" }}{{ .hf_token }}{{ end }}
        EOT
      }

      resources {
        cpu    = 4000
        memory = 32768

        device "nvidia/gpu" {
          count = 1
        }
      }

      kill_timeout = "60s"
    }
  }
}
