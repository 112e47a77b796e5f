# The guest images the demo and the tests use, built into images/cache/out.
# Included by the top-level Makefile; `make images` builds what is missing or
# out of date. Each image depends on the build script and the guest files, so a
# second run with unchanged inputs does nothing.

IMAGES_OUT := images/cache/out
TINY_INPUTS := images/build $(wildcard images/tiny/*)
CLOUD_INPUTS := images/build-cloud

# stem:family:version:variant
TINY_SET := \
	tiny-1.0:1:1.0:ok \
	tiny-1.1:1:1.1:ok \
	tiny-2.0:2:2.0:ok \
	tiny-2.1:2:2.1:ok \
	tiny-1.2-broken-ssh:1:1.2:broken-ssh \
	tiny-1.3-panic:1:1.3:panic

TINY_IMAGES := $(foreach i,$(TINY_SET),$(IMAGES_OUT)/$(word 1,$(subst :, ,$(i))).qcow2)
CLOUD_IMAGES := $(IMAGES_OUT)/debian-12.0.qcow2

.PHONY: images images-tiny images-cloud

images: images-tiny images-cloud
images-tiny: $(TINY_IMAGES)
images-cloud: $(CLOUD_IMAGES)

$(IMAGES_OUT):
	mkdir -p $@

define tiny_rule
$(IMAGES_OUT)/$(word 1,$(subst :, ,$(1))).qcow2: $(TINY_INPUTS) | $(IMAGES_OUT) $(VENV)/.installed
	rm -f $$@ $$(@:.qcow2=.yaml)
	$(PY) images/build --family $(word 2,$(subst :, ,$(1))) --version $(word 3,$(subst :, ,$(1))) \
		--variant $(word 4,$(subst :, ,$(1))) --out $(IMAGES_OUT)
endef
$(foreach i,$(TINY_SET),$(eval $(call tiny_rule,$(i))))

$(IMAGES_OUT)/debian-12.0.qcow2: $(CLOUD_INPUTS) | $(IMAGES_OUT) $(VENV)/.installed
	rm -f $@ $(@:.qcow2=.yaml)
	PYTHON=$(PYTHON) bash images/build-cloud --version 12.0 --out $(IMAGES_OUT)

# The lab's hypervisor host (a vagrant-libvirt box of Debian 12 with hvagent's packages):
# `make images-host-box`, rebuilt when its build script or the role's package list changes.
# Not part of `make images`.
HOST_BOX := $(IMAGES_OUT)/hvhost-bookworm.box
HOST_BOX_INPUTS := images/build-host-box $(wildcard ansible/roles/hvagent/defaults/main.yml)

.PHONY: images-host-box
images-host-box: $(HOST_BOX)

$(HOST_BOX): $(HOST_BOX_INPUTS) | $(IMAGES_OUT) $(VENV)/.installed
	rm -f $@
	bash images/build-host-box --out $(IMAGES_OUT)

# Installer media and the images installed from them (issue 16): `make images-install`.
# Not part of `make images` (CI time, about 75 s). tiny 1.4 is installed from the BIOS/UEFI
# ISO under SeaBIOS, 1.5 over PXE (pxelinux from QEMU's TFTP), 2.2 from the ISO under OVMF.
# Each installed image holds the same bytes images/build writes for that version.
INSTALLER_INPUTS := images/build-installer images/tinybuild.py $(wildcard images/installer/*) $(TINY_INPUTS)
FROM_ISO_INPUTS := images/build-from-iso images/tinybuild.py images/build
INSTALL_SET := $(IMAGES_OUT)/tinyiso-1.4.iso $(IMAGES_OUT)/tinypxe-1.5.yaml $(IMAGES_OUT)/tinyiso-2.2.iso \
	$(IMAGES_OUT)/tiny-1.4.qcow2 $(IMAGES_OUT)/tiny-1.5.qcow2 $(IMAGES_OUT)/tiny-2.2.qcow2

.PHONY: images-install
images-install: $(INSTALL_SET)

$(IMAGES_OUT)/tinyiso-%.iso: $(INSTALLER_INPUTS) | $(IMAGES_OUT) $(VENV)/.installed
	rm -f $@ $(@:.iso=.yaml)
	$(PY) images/build-installer --family $(firstword $(subst ., ,$*)) --version $* --iso --out $(IMAGES_OUT)

# the bundle is a directory; its manifest, written last, stands for it
$(IMAGES_OUT)/tinypxe-%.yaml: $(INSTALLER_INPUTS) | $(IMAGES_OUT) $(VENV)/.installed
	rm -rf $@ $(@:.yaml=)
	$(PY) images/build-installer --family $(firstword $(subst ., ,$*)) --version $* --pxe --out $(IMAGES_OUT)

$(IMAGES_OUT)/tiny-1.4.qcow2 $(IMAGES_OUT)/tiny-2.2.qcow2: $(IMAGES_OUT)/tiny-%.qcow2: \
		$(IMAGES_OUT)/tinyiso-%.iso $(FROM_ISO_INPUTS) | $(VENV)/.installed
	rm -f $@ $(@:.qcow2=.yaml)
	$(PY) images/build-from-iso --iso $< --out $(IMAGES_OUT)

$(IMAGES_OUT)/tiny-1.5.qcow2: $(IMAGES_OUT)/tinypxe-1.5.yaml $(FROM_ISO_INPUTS) | $(VENV)/.installed
	rm -f $@ $(@:.qcow2=.yaml)
	$(PY) images/build-from-iso --pxe $(<:.yaml=) --out $(IMAGES_OUT)
