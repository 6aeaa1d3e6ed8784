# The two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
CLUSTER := e2e/cluster

.PHONY: all build tools cluster node cluster-down lint crds test test-unit test-e2e demo bench clean

all: build

tools:
	@hack/ensure-tools

build: tools
	cargo build --bins

## The local control plane (etcd, kube-apiserver, kube-controller-manager).
cluster: tools
	$(CLUSTER) up

## The control plane plus one real node (kube-scheduler, containerd, runc,
## kubelet), so Pods run; the tests in tests/e2e/node.rs need it.
node: tools
	$(CLUSTER) up --node

cluster-down:
	$(CLUSTER) down

## fmt, clippy and the CRD drift check (the drift check is also a unit test).
lint: tools
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

## Regenerate crds/ (and the chart's copy) from the Rust types.
crds:
	cargo run --quiet -- crd > crds/agenttoken.dev.yaml
	cp crds/agenttoken.dev.yaml charts/agent-token-operator/crds/agenttoken.dev.yaml
	cargo run --quiet -- reference > docs/reference.md

## The whole suite: lint, unit tests and end-to-end tests on the local control
## plane and its node.
test: lint node
	cargo test --no-fail-fast -- --test-threads=$${TEST_THREADS:-8}

test-unit: tools
	cargo test --lib

test-e2e: node
	cargo test --test e2e -- --test-threads=$${TEST_THREADS:-8}

## Scale benchmark on its own local control plane; writes target/bench/report.md.
## BENCH_ARGS="--quick" for a 1,000-token run, "--only floor,revocation" to pick.
bench: tools
	cargo bench --bench scale -- $(BENCH_ARGS)

demo: build cluster
	hack/demo

clean: cluster-down
	cargo clean
