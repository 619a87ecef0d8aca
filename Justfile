# Switchboard's tasks: one entry point each, used by CI (.ci/run) and the README alike.

set shell := ["bash", "-euo", "pipefail", "-c"]

# list the recipes
default:
    @just --list

# install the project and its development tools
install:
    python -m pip install -q -e '.[dev]'

# serve the example configuration with a throwaway identity and a local stand-in upstream
demo:
    LITELLM_LOCAL_MODEL_COST_MAP=True python -m demo

# run the test suite
test *ARGS:
    python -m pytest {{ARGS}}

# ruff (lint and format), mypy strict on service/, and the layers of the architecture
lint:
    ruff check .
    ruff format --check .
    mypy
    lint-imports

# check the shipped examples, as CI does on a pull request
validate:
    python -m service validate providers.d

# fail when schemas/ is stale
schema-check:
    python -m service schema --check

# regenerate schemas/ from the models
schema:
    python -m service schema

# benchmarks: the gateway against direct and LiteLLM's proxy, the configuration service, replicas
bench:
    python -m bench.litellm_proxy setup
    python -m bench.gateway
    python -m bench.config
    python -m bench.events
    python -m bench.replicas

# everything CI runs
ci: lint schema-check validate test
