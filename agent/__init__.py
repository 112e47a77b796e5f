"""hvagent: a hypervisor host agent that runs VMs from versioned qcow2 guest OS images."""

__version__ = "0.1.0"
