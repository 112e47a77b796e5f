# hvagent: `make demo` and `make test` are all a newcomer needs on a fresh Debian 12 host.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTHON := $(abspath $(PY))
export PYTHON

.PHONY: all host host-demo venv images demo test test-unit test-integration lint bench clean bundle bundle-debs \
	host-container

all: test

# The host's Debian packages and daemons: all that the tests use (.ci/host-setup), or, when `demo` is
# the only goal, only what the demo and images-tiny use (no Docker, no Vagrant).
host:
	@bash .ci/host-setup
host-demo:
	@bash .ci/host-setup demo
HOST := $(if $(filter-out demo,$(or $(MAKECMDGOALS),all)),host,host-demo)

$(VENV)/.installed: pyproject.toml | $(HOST)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $@

venv: $(HOST) $(VENV)/.installed

include images/images.mk

images: venv

demo: venv images-tiny
	$(VENV)/bin/hvagent demo

# Every test, the Vagrant lab's end to end included (`-m "not lab"` leaves it out).
test: venv images
	$(VENV)/bin/pytest tests

test-unit: venv
	$(VENV)/bin/pytest tests/unit

# Benchmarks: ratios against baselines measured in the same run; never part of `make test`.
bench: venv images-tiny
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/run.py

lint: venv
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/mypy
	cd ansible && ../$(VENV)/bin/ansible-lint --offline -q

# What the Ansible role installs hosts from (build/bundle): wheels; debs for air-gapped hosts.
bundle: venv
	ansible/build-bundle
bundle-debs: venv
	ansible/build-bundle --debs

# The Docker fleet's bare Debian 12 host image (docker import of an mmdebstrap tree).
host-container: host
	images/build-host-container

clean:
	rm -rf $(VENV) images/cache/out

# The Vagrant lab (README: Lab): hypervisor hosts hv1..hvN in the network namespace `hvlab`
# with a libvirtd of their own, provisioned by ansible/site.yml; then a guest on hv1.
.PHONY: lab lab-destroy test-lab
lab: venv bundle images-host-box images-tiny
	bash lab/up

lab-destroy:
	bash lab/destroy

# Only the lab's end to end: `make lab`, its checks, then `make lab-destroy` whatever happened.
test-lab: venv images
	$(VENV)/bin/pytest -m lab tests/integration/test_lab.py
