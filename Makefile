# ukai — see README.md. Every target runs on a fresh Debian 12 machine with Go;
# `make deps` installs the Debian packages the tests need (as root).
SHELL := /bin/bash
GO ?= go
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)
BIN := bin/ukai

.PHONY: install consul all build test test-cinder test-short test-integration conformance bench fuzz lint deps demo demo-stop clean test-vm chaos

all: build

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/ukai

# The binary, the example configuration and the systemd unit. PREFIX
# (/usr/local) holds bin/ukai, share/ukai/ (examples) and
# lib/systemd/system/ukai.service, share/doc/ukai/ (README, docs); SYSCONFDIR (/etc) gets ukai/node.yaml
# only if it has none (a configured node keeps its own). DESTDIR stages
# the whole tree (packaging).
PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
install: build
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/ukai
	install -D -m 0644 configs/node.yaml $(DESTDIR)$(PREFIX)/share/ukai/node.yaml.example
	install -D -m 0644 configs/consul/agent.hcl $(DESTDIR)$(PREFIX)/share/ukai/consul-agent.hcl.example
	install -D -m 0644 configs/systemd/consul.service $(DESTDIR)$(PREFIX)/share/ukai/consul.service.example
	mkdir -p $(DESTDIR)$(PREFIX)/lib/systemd/system
	install -D -m 0644 -t $(DESTDIR)$(PREFIX)/share/doc/ukai README.md docs/*.md
	sed -e 's|@BINDIR@|$(PREFIX)/bin|g' -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' configs/systemd/ukai.service > $(DESTDIR)$(PREFIX)/lib/systemd/system/ukai.service
	chmod 0644 $(DESTDIR)$(PREFIX)/lib/systemd/system/ukai.service
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/ukai/node.yaml ]; then \
	  echo "kept $(DESTDIR)$(SYSCONFDIR)/ukai/node.yaml (the new example is $(PREFIX)/share/ukai/node.yaml.example)"; \
	else install -D -m 0640 configs/node.yaml $(DESTDIR)$(SYSCONFDIR)/ukai/node.yaml; fi

# Debian packages the integration tests, conformance run and benchmarks use.
deps:
	@missing=""; for p in libiscsi-bin qemu-utils qemu-block-extra tgt fio curl; do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; fi
	@missing=""; for p in python3-cinder python3-stestr python3-ddt python3-oslotest prometheus chromium fonts-dejavu-core; do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null; fi

# A consul binary: the one on PATH, else built once from the Go module proxy
# into .cache/ (a few minutes the first time).
consul:
	@bash integration/get-consul.sh >/dev/null

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed: $$out"; exit 1; fi
	$(GO) vet ./...

# Everything: lint, unit tests, integration tests against real ukai
# processes and iSCSI clients, and the iscsi-test-cu conformance run
# (ukai against tgtd, checked against integration/conformance/expected.txt).
# -p 1: one package at a time, so the timing bounds of the gossip and
# failover tests are not measured on a machine busy with another package.
test: deps consul lint build test-cinder
	$(GO) test -p 1 -count=1 -timeout 25m ./...

# The Cinder driver's unit tests, on Cinder's own test base (Debian's
# python3-cinder; /usr/bin/python3, which sees it). Its end-to-end test
# against a real cluster runs in the Go integration tests
# (TestCinderDriverEndToEnd).
test-cinder:
	cd integration/cinder && /usr/bin/python3 -m unittest discover -s ukai_cinder/tests -t .

# Unit tests only (pure Go, no processes, no network clients).
test-short: lint
	$(GO) test -count=1 -short ./...

test-integration: deps consul build
	$(GO) test -count=1 -timeout 20m -v ./integration/

conformance: deps build
	$(GO) test -count=1 -timeout 20m -v -run 'TestConformance' ./integration/

# One long randomized fault run (integration/chaos, docs/testing.md):
# Consul and five nodes under a seeded nemesis while qemu-io clients write
# and read; the history is checked. A failing run prints its seed: run it
# again with the same SEED. The short form (fixed seeds) is in `make test`.
SEED ?= 1
DURATION ?= 10m
chaos: deps consul build
	$(GO) test -count=1 -timeout 0 -v -run 'TestChaos$$' ./integration/chaos/ -args -chaos.seed=$(SEED) -chaos.duration=$(DURATION)

# Speed: ukai vs tgtd vs the raw file, interleaved, one table.
# Then the control plane: idle cost against images (3 real nodes, 30 to
# 3000 images), a simulation of 10 to 100 nodes against one Consul, and
# the CPU per GB of 4 KiB writes to a remote copy.
bench: deps consul build
	$(GO) test -count=1 -tags bench -timeout 90m -v -run 'TestBench$$|TestBenchMemory|TestBenchSyncImpact|TestBenchScale|TestBenchControlPlaneSim|TestBenchQoS|TestBenchRevert' ./integration/ -args -bench-report=$(CURDIR)/integration/out/bench.md
	$(GO) test -count=1 -run '^$$' -bench 'BenchmarkRemoteWrite4KCPU' -benchtime 200000x ./cluster/peer/ | tee -a integration/out/bench.md
	@cat integration/out/bench.md

# Every parser the target has (PDU header and data segment, login/text
# keys, CHAP, CDBs, a live session fed garbage), the peer block protocol
# (frame headers, a live connection fed garbage) and the metadata decoders.
# Their corpora are checked in under testdata/fuzz and run by every go test.
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzReadPDU$$' -fuzztime 60s ./target/iscsi/
	$(GO) test -run '^$$' -fuzz '^FuzzParseText$$' -fuzztime 30s ./target/iscsi/
	$(GO) test -run '^$$' -fuzz '^FuzzCHAPStep$$' -fuzztime 30s ./target/iscsi/
	$(GO) test -run '^$$' -fuzz '^FuzzSession$$' -fuzztime 60s ./target/iscsi/
	$(GO) test -run '^$$' -fuzz '^FuzzSessionLimits$$' -fuzztime 60s ./target/iscsi/
	$(GO) test -run '^$$' -fuzz '^FuzzExecute$$' -fuzztime 60s ./target/scsi/
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeReq$$' -fuzztime 30s ./cluster/peer/
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeResp$$' -fuzztime 30s ./cluster/peer/
	$(GO) test -run '^$$' -fuzz '^FuzzBlkSession$$' -fuzztime 60s ./cluster/peer/
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeChunk$$' -fuzztime 30s ./placement/
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeChunkAt$$' -fuzztime 30s ./placement/
	$(GO) test -run '^$$' -fuzz '^FuzzParseWindow$$' -fuzztime 30s ./placement/

# Consul and three nodes on loopback; an image written and read over iSCSI.
demo: deps consul build
	@bash integration/demo.sh start

demo-stop:
	@bash integration/demo.sh stop

clean:
	rm -rf bin integration/out

# A real VM (QEMU, TCG) on a replicated image over iSCSI, live-migrated from
# n1's target to n2's, then checked through every copy and after a
# relocation (integration/vm; setup.sh installs QEMU and a kernel as root).
test-vm: deps consul build
	bash integration/vm/setup.sh && $(GO) test -count=1 -tags vm -timeout 20m -v ./integration/vm/
