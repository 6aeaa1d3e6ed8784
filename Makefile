# The two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
CLUSTER := e2e/cluster

.PHONY: all build tools image cluster node cluster-down lint crds test test-unit test-e2e chaos demo bench clean

all: build

tools:
	@hack/ensure-tools

build: tools
	cargo build --bins

## The operator's image as an OCI archive, without a container engine
## (hack/image: the release binary and the libraries it loads; the
## Containerfile builds the same tree). IMAGE_ARGS="--version 0.2.0" or
## "--out FILE". Push it with skopeo (see the README).
image: tools
	hack/image build $(IMAGE_ARGS)

## The local control plane (etcd, kube-apiserver, kube-controller-manager).
cluster: tools
	$(CLUSTER) up

## The control plane plus one real node (kube-scheduler, containerd, runc,
## kubelet), so Pods run; the tests in tests/e2e/node.rs need it.
node: tools
	$(CLUSTER) up --node

cluster-down:
	$(CLUSTER) down

## fmt, clippy and the CRD drift check (the drift check is also a unit test);
## the GitHub workflows with actionlint (and shellcheck on their scripts);
## dependencies with cargo-deny: licences, duplicate versions, bans and
## sources (deny.toml). Advisories need the RustSec database, which cannot
## be fetched here: the ci and release workflows check them.
lint: tools
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	"$$(hack/release-tools)/actionlint" -no-color
	"$$(hack/cargo-tools)/cargo-deny" check --hide-inclusion-graph bans licenses sources

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

## The chaos test's long version (issue 17; `make test` runs a short one):
## per issuer kind (webhook stand-in, serviceAccount, OpenBao, oauth2 on the
## real oidc-provider, GitHub App stand-in, jwt), 200 AgentTokens minted and
## rotated while the operator is SIGKILLed 20 times at random moments; then
## every token each issuer issued must be in a Secret, revoked, or Unknown in
## the ledger (jwt: every JWT delivered is in the ledger, honestly). The seed
## is printed; CHAOS_SEED=<seed> repeats the test's choices. CHAOS_ONLY=webhook
## (or service_account, openbao, oauth2, github_app, jwt) picks one kind;
## CHAOS_THREADS=6 runs them at once.
CHAOS_AGENTTOKENS ?= 200
CHAOS_KILLS ?= 20
CHAOS_ONLY ?=
chaos: cluster
	CHAOS_AGENTTOKENS=$(CHAOS_AGENTTOKENS) CHAOS_KILLS=$(CHAOS_KILLS) \
		cargo test --test e2e chaos_$(CHAOS_ONLY) -- --nocapture --test-threads=$${CHAOS_THREADS:-1}

## Scale benchmark on its own local control plane; writes target/bench/report.md.
## BENCH_ARGS="--quick" for a 1,000-token run, "--only floor,revocation" to pick.
bench: tools
	cargo bench --bench scale -- $(BENCH_ARGS)

demo: build cluster
	hack/demo

clean: cluster-down
	cargo clean
