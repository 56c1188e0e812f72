# oncelog: `just` lists the recipes.

set dotenv-load := false

# The stack needs only the workspace; tests, linters and the bench each add their dependency group.
python := "uv run --frozen python"
dev := "uv run --frozen --group dev"

# list the recipes
default:
    @just --list --unsorted

# run the whole stack (embedded NATS + PostgreSQL, consumer, API) in the foreground, restarting what crashes; Ctrl-C stops it
up *args:
    exec {{python}} -m oncelog.local.up {{args}}

# run the stack on a local three-node NATS cluster with R3 streams (ports 4222-4224)
up-cluster *args:
    exec {{python}} -m oncelog.local.cluster {{args}}

# measure the drain rate with 1, 2 and 4 consumer replicas (e.g. `just bench-scaling --events 200000`)
bench-scaling *args:
    uv run --frozen --group bench python bench/scaling.py {{args}}

# publish generated events to the stack `just up` runs, found by the same NATS_PORT/NATS_URL (e.g. `just publish --count 10000 --replay-old 0`)
publish *args:
    exec {{python}} -m oncelog.publisher {{args}}

# follow the stored events live, one JSON line each (e.g. `just tail 'auth.>'`; `--after 0-0` starts from the beginning)
tail *args:
    exec {{python}} -m oncelog.local.tail {{args}}

# run the test suite (unit and integration, real servers; fault scenarios marked slow excluded), then the consumer's tests on nats-py's public path
test *args:
    {{dev}} pytest -m "not slow" {{args}}
    # nats-py's own path decodes a subject strictly, and one not UTF-8 ends its read loop: only the fast path passes that test.
    ONCELOG_FAST_WIRE=0 {{dev}} pytest -m "not slow" tests/integration/test_pipeline.py tests/integration/test_pull.py tests/integration/test_publish.py tests/integration/test_api_publish.py --deselect tests/integration/test_pipeline.py::test_subjects_of_any_bytes_are_dead_letters_and_block_nothing {{args}}

# run the fault-injection scenarios and a long fuzzing run (fresh random inputs), and print their tables
test-faults *args:
    {{dev}} pytest tests/faults -m "faults" {{args}}
    ONCELOG_FUZZ_ROUNDS=400 {{dev}} pytest tests/integration/test_fuzz_e2e.py tests/unit/test_validate_properties.py {{args}}

# run compose.yaml for real on a Docker engine of its own with stand-in images, then remove it all (root; about 7 minutes; see docs/deploy.md)
test-compose *args:
    bash tests/compose/run.sh {{args}}

# benchmark throughput, latency, queries and memory (`--quick` for a one-minute smoke run)
bench *args:
    uv run --frozen --group bench python bench/run.py {{args}}

# format the code
fmt:
    {{dev}} ruff format .
    {{dev}} ruff check --fix .

# format check, lint and types
lint:
    {{dev}} ruff format --check .
    {{dev}} ruff check .
    uv run --frozen --all-groups mypy libs services local tests bench

# what CI runs: lint, then the tests
check: lint test

# delete the stack's data (.data/) and caches
clean:
    rm -rf .data .pytest_cache .mypy_cache .ruff_cache bench-results
