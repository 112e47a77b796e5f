"""This host's capabilities as unit tests give them: libvirt's domain capabilities captured from
``virsh domcapabilities --virttype qemu --machine q35 --arch x86_64`` on Debian 12 (libvirt 9.0,
QEMU 7.2, CPU models left out) and QEMU's firmware descriptors as Debian's ovmf package writes
them. ``CAPS`` runs every tiny image; a Catalog in a unit test takes ``caps=lambda: CAPS``."""

from __future__ import annotations

from typing import Any

from agent.compat import host_caps

DOMCAPS = """<domainCapabilities>
  <path>/usr/bin/qemu-system-x86_64</path>
  <domain>qemu</domain>
  <machine>pc-q35-7.2</machine>
  <arch>x86_64</arch>
  <vcpu max='288'/>
  <iothreads supported='yes'/>
  <os supported='yes'>
    <enum name='firmware'>
      <value>efi</value>
    </enum>
    <loader supported='yes'>
      <value>/usr/share/OVMF/OVMF_CODE_4M.ms.fd</value>
      <value>/usr/share/OVMF/OVMF_CODE_4M.secboot.fd</value>
      <value>/usr/share/OVMF/OVMF_CODE_4M.fd</value>
      <enum name='type'>
        <value>rom</value>
        <value>pflash</value>
      </enum>
      <enum name='readonly'>
        <value>yes</value>
        <value>no</value>
      </enum>
      <enum name='secure'>
        <value>yes</value>
        <value>no</value>
      </enum>
    </loader>
  </os>
  <devices>
    <disk supported='yes'>
      <enum name='diskDevice'>
        <value>disk</value>
        <value>cdrom</value>
        <value>floppy</value>
        <value>lun</value>
      </enum>
      <enum name='bus'>
        <value>fdc</value>
        <value>scsi</value>
        <value>virtio</value>
        <value>usb</value>
        <value>sata</value>
      </enum>
      <enum name='model'>
        <value>virtio</value>
        <value>virtio-transitional</value>
        <value>virtio-non-transitional</value>
      </enum>
    </disk>
    <rng supported='yes'>
      <enum name='model'>
        <value>virtio</value>
        <value>virtio-transitional</value>
        <value>virtio-non-transitional</value>
      </enum>
      <enum name='backendModel'>
        <value>random</value>
        <value>egd</value>
        <value>builtin</value>
      </enum>
    </rng>
    <channel supported='yes'>
      <enum name='type'>
        <value>pty</value>
        <value>unix</value>
        <value>spicevmc</value>
      </enum>
    </channel>
  </devices>
</domainCapabilities>
"""


def descriptor(code: str, template: str, features: list[str]) -> dict[str, Any]:
    """A QEMU firmware descriptor as Debian's ovmf package writes them (/usr/share/qemu/firmware)."""
    return {"interface-types": ["uefi"], "features": features,
            "mapping": {"device": "flash", "executable": {"filename": code, "format": "raw"},
                        "nvram-template": {"filename": template, "format": "raw"}},
            "targets": [{"architecture": "x86_64", "machines": ["pc-i440fx-*", "pc-q35-*"]}]}


OVMF = "/usr/share/OVMF"
DESCRIPTORS = [
    descriptor(f"{OVMF}/OVMF_CODE_4M.ms.fd", f"{OVMF}/OVMF_VARS_4M.ms.fd",
               ["enrolled-keys", "requires-smm", "secure-boot"]),
    descriptor(f"{OVMF}/OVMF_CODE_4M.secboot.fd", f"{OVMF}/OVMF_VARS_4M.fd", ["requires-smm", "secure-boot"]),
    descriptor(f"{OVMF}/OVMF_CODE_4M.fd", f"{OVMF}/OVMF_VARS_4M.fd", ["acpi-s3", "amd-sev", "verbose-dynamic"]),
]
QEMU_7_2_22 = 7_002_022
CAPS = host_caps(QEMU_7_2_22, "qemu", "q35", DOMCAPS, descriptors=DESCRIPTORS)
