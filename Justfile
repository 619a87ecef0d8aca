# Switchboard's tasks: one entry point each, used by CI (.ci/run) and the README alike.

set shell := ["bash", "-euo", "pipefail", "-c"]

# list the recipes
default:
    @just --list

# install the project and its development tools
install:
    python -m pip install -q -e '.[dev]'

# `switchboard serve` (ARGS: --providers, --host, --port, --events); the age identity from
# SOPS_AGE_KEY_FILE or SOPS_AGE_KEY, the settings from SWITCHBOARD_* (docs/reference.md §3)
serve *ARGS:
    LITELLM_LOCAL_MODEL_COST_MAP=True python -m service serve {{ARGS}}

# serve the example configuration with a throwaway identity and a local stand-in upstream
demo:
    LITELLM_LOCAL_MODEL_COST_MAP=True python -m demo

# photograph each page of the web console on the demo's configuration, into docs/console/
screenshots:
    LITELLM_LOCAL_MODEL_COST_MAP=True python -m demo.screenshots

# run the test suite
test *ARGS:
    python -m pytest {{ARGS}}

# ruff (lint and format), mypy strict on service/, the layers of the architecture, deploy/
lint: && deploy-lint
    ruff check .
    ruff format --check .
    mypy
    lint-imports

# kubernetes-validate checks every manifest strictly (unknown fields are errors), on the newest
# Kubernetes it knows and on the oldest the manifests support (1.29: native sidecars). A kind it
# has no schema for is only a warning there, so any output fails here; custom resources
# (deploy/kubernetes/prometheus-operator/) stay out of that folder and of this check.
#
# the deployment files, each by its ecosystem's linter (docs/deploy.md); no container engine needed
deploy-lint:
    hadolint deploy/Dockerfile
    shellcheck deploy/*.sh
    check-jsonschema --builtin-schema vendor.compose-spec deploy/compose.yaml
    @for k in "" 1.29.0; do if ! out="$(kubernetes-validate --strict --quiet ${k:+-k "$k"} deploy/kubernetes/*.yaml 2>&1)" || [ -n "$out" ]; then echo "$out"; exit 1; fi; done; echo "kubernetes-validate: deploy/kubernetes/*.yaml ok"

# check the shipped examples, as CI does on a pull request
validate:
    python -m service validate providers.d

# fail when schemas/ is stale
schema-check:
    python -m service schema --check

# regenerate schemas/ from the models
schema:
    python -m service schema

# benchmarks: the gateway against direct and LiteLLM's proxy (which first starts from `export litellm`'s
# file, checked), the configuration service, replicas, consumers behind a balancer
bench:
    python -m bench.litellm_proxy setup
    python -m bench.litellm_export
    python -m bench.gateway
    python -m bench.instructions
    python -m bench.protocols
    python -m bench.tracing
    python -m bench.config
    python -m bench.events
    python -m bench.replicas
    python -m bench.consumers
    python -m bench.console
    python -m bench.limits

# everything CI runs
ci: lint schema-check validate test
