# darkcore's two commands: `make demo` shows a DevicePool as a Ready node in a real cluster;
# `make test` proves it (fmt, clippy, unit tests, then end-to-end tests on a real control plane).
SHELL := bash
.SHELLFLAGS := -euo pipefail -c

# Build output and Go caches live outside the clone, so warm runs take minutes.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/darkcore/target
export DARKCORE_CLUSTER_DIR ?= $(CURDIR)/target/cluster
# The pinned control-plane versions; the kubectl built with them serves where none is installed.
include tests/cluster/versions.env
export PATH := $(PATH):$(HOME)/.cache/darkcore/k8s-$(K8S_VERSION):$(HOME)/.cache/darkcore/helm-$(HELM_VERSION)
OPERATOR := $(CARGO_TARGET_DIR)/debug/darkcore-operator

.PHONY: test bench demo demo-down fmt-check clippy unit build e2e crds cluster-up cluster-down package package-check

test: fmt-check clippy unit package-check e2e

fmt-check:
	cargo fmt --all -- --check

clippy:
	cargo clippy --workspace --all-targets -- -D warnings

unit:
	cargo test --workspace --exclude darkcore-e2e

build:
	cargo build --workspace --bins

# The agent's Debian package (release build) in $(CARGO_TARGET_DIR)/debian.
package:
	packaging/deb/build

# The package's contents and its systemd unit (systemd-analyze verify), from the debug build.
package-check:
	tests/package/check

# The chart's tests first, one at a time: their uninstall takes away the release that the e2e
# tests share (and reinstall). Then the e2e tests on the plain control plane, and last those
# that need the real node (a kubelet, containerd, metrics-server), which starts only then.
e2e: build cluster-up
	KUBECONFIG=$(DARKCORE_CLUSTER_DIR)/kubeconfig DARKCORE_OPERATOR_BIN=$(OPERATOR) \
	  cargo test -p darkcore-e2e --test chart -- --test-threads=1
	KUBECONFIG=$(DARKCORE_CLUSTER_DIR)/kubeconfig DARKCORE_OPERATOR_BIN=$(OPERATOR) \
	  cargo test -p darkcore-e2e --test e2e -- --test-threads=8 --skip real_node::
	tests/cluster/node up
	KUBECONFIG=$(DARKCORE_CLUSTER_DIR)/kubeconfig DARKCORE_OPERATOR_BIN=$(OPERATOR) \
	  cargo test -p darkcore-e2e --test e2e -- --test-threads=1 real_node::

# Regenerate the committed CRD YAML from the Rust types in crds/src, and the chart's copy.
crds: build
	$(OPERATOR) crds > crds/generated/crds.yaml
	cp crds/generated/crds.yaml charts/darkcore/crds/crds.yaml

cluster-up:
	tests/cluster/up

cluster-down:
	tests/cluster/down

# Benchmarks (release builds; about 30 minutes warm on 2 cores): BENCHMARKS.md and benchmarks.json. They measure
# and report, and never fail on speed.
bench:
	scripts/bench/run

demo: build
	scripts/demo-up

demo-down:
	scripts/demo-down
