# The large model pool: vLLM serving the 70B model on four GPUs per replica, registered in
# Nomad's service discovery as llm-large (the sidecars' template reads it). The scaler
# changes `count` of group "server" within the `scaling` bounds below; a cold start takes
# about 15 minutes.
#
# Before the first run: a Hugging Face token for the gated Llama weights in Nomad Variables
# (nomad var put nomad/jobs/llm-large hf_token=hf_…) and a host volume "hf-cache" on the GPU
# nodes (client { host_volume "hf-cache" { path = "/opt/hf-cache" } }) so a restart or a
# new allocation on the same node does not download the weights again.

variable "model" {
  type    = string
  default = "meta-llama/Llama-3.1-70B-Instruct"
}

variable "served_model_name" {
  type    = string
  default = "llama-3.1-70b-instruct"
}

# Pinned: a new vLLM release is a deliberate change, never a side effect of a restart.
variable "vllm_image" {
  type    = string
  default = "vllm/vllm-openai:v0.8.5"
}

job "llm-large" {
  type = "service"

  group "server" {
    count = 1

    # Nomad holds every scale call to min/max, whoever makes it.
    scaling {
      # The stock Nomad Autoscaler alternative, as in model-pool.hcl: set enabled = true
      # and run the scaler with SIDECAR_SCALER_DRY_RUN=1; never both at once.
      enabled = false
      min     = 1
      max     = 4

      policy {
        evaluation_interval = "15s"
        cooldown            = "1m"

        check "llm-sidecar-forecast" {
          source       = "prometheus"
          query        = "max(llm_sidecar_scaler_forecast_ratio{pool=\"large\"})"
          query_window = "1m"
          on_error     = "ignore"

          strategy "target-value" {
            target    = 1
            threshold = 0.01
          }
        }
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
      name     = "llm-large"
      provider = "nomad"
      port     = "http"

      # vLLM answers /health with 200 only once the model is loaded; a cold start of the
      # large model takes about 15 minutes, hence the long grace.
      check {
        name     = "vllm-health"
        type     = "http"
        path     = "/health"
        interval = "10s"
        timeout  = "3s"

        check_restart {
          limit = 3
          grace = "25m"
        }
      }
    }

    # A cold start takes ~15 minutes: the healthy deadline allows for it, and Nomad requires
    # it to stay below the progress deadline (default 10m, so it is raised here).
    update {
      max_parallel      = 1
      min_healthy_time  = "30s"
      healthy_deadline  = "30m"
      progress_deadline = "45m"
    }

    migrate {
      max_parallel     = 1
      min_healthy_time = "30s"
      healthy_deadline = "30m"
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
          "--tensor-parallel-size", "4",
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
        HF_TOKEN={{ with nomadVar "nomad/jobs/llm-large" }}{{ .hf_token }}{{ end }}
        EOT
      }

      resources {
        cpu    = 16000
        memory = 196608

        device "nvidia/gpu" {
          count = 4
        }
      }

      kill_timeout = "60s"
    }
  }
}
