"""The Ansible role's check of libvirt's qemu.conf (ansible/roles/hvagent/tasks/qemu-conf.yml):
QEMU stays unprivileged (README: Security model), or the play fails naming the setting, its
value and the value expected. One ansible-playbook run on this machine (connection local), one
inventory host per qemu.conf; the fleet test (tests/integration/test_fleet.py) runs the same
check inside site.yml on its host containers."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit

VENV_BIN = Path(os.environ.get("PYTHON", ROOT / ".venv/bin/python")).parent
PLAYBOOK = """\
- name: The role's qemu.conf check
  hosts: all
  gather_facts: false
  tasks:
    - name: QEMU settings
      ansible.builtin.include_role:
        name: hvagent
        tasks_from: qemu-conf.yml
"""
# As Debian 12's libvirt-daemon-system ships it: every setting commented out (its defaults).
DEBIAN = """\
#security_driver = "selinux"
#security_default_confined = 1
#user = "libvirt-qemu"
#group = "libvirt-qemu"
#dynamic_ownership = 1
#remember_owner = 1
"""
# host -> (qemu.conf, or None for no file; the message expected, or None when the play passes)
CASES: dict[str, tuple[str | None, str | None]] = {
    "debian-default": (DEBIAN, None),
    "no-file": (None, None),
    "explicit": (DEBIAN + 'user = "libvirt-qemu"\ngroup="libvirt-qemu"\ndynamic_ownership = 1 # own disks\n'
                 'security_driver = [ "apparmor" ]\nuser_extra = "root"\n', None),
    "apparmor": ('security_driver = "apparmor"\n', None),
    "root-user": (DEBIAN + 'user = "root"  # for a test\n',
                  'user is "root"; expected: "libvirt-qemu" (or unset)'),
    "root-by-uid": (DEBIAN + 'user = "libvirt-qemu"\n  user = "+0"\n',
                    'user is "+0"; expected: "libvirt-qemu" (or unset)'),
    "root-group": ('group = "root"\n', 'group is "root"; expected: "libvirt-qemu" (or unset)'),
    "no-chown": ("dynamic_ownership = 0\n", "dynamic_ownership is 0; expected: 1 (or unset)"),
    "no-mac": ('security_driver = "none"\n', 'security_driver is "none"; expected: "apparmor" (or unset)'),
    "no-mac-list": ('security_driver = [\n  "none"\n]\n',
                    'security_driver is ["none"]; expected: "apparmor" (or unset)'),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Each inventory host's failure messages (empty: its play passed)."""
    playbook = VENV_BIN / "ansible-playbook"
    if not playbook.exists():
        pytest.skip(f"{playbook} is missing (make venv)")
    work = tmp_path_factory.mktemp("qemuconf")
    hosts = {}
    for host, (text, _) in CASES.items():
        conf = work / host / "qemu.conf"
        conf.parent.mkdir()
        if text is not None:
            conf.write_text(text)
        hosts[host] = {"ansible_connection": "local", "ansible_python_interpreter": str(VENV_BIN / "python"),
                       "hvagent_qemu_conf_path": str(conf)}
    (work / "inventory.json").write_text(json.dumps({"all": {"hosts": hosts}}))
    (work / "play.yml").write_text(PLAYBOOK)
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROOT / "ansible/roles"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json", "ANSIBLE_LOCALHOST_WARNING": "0"}
    r = subprocess.run([str(playbook), "-i", str(work / "inventory.json"), str(work / "play.yml")],
                       capture_output=True, text=True, env=env, cwd=work, timeout=300)
    assert r.stdout.lstrip().startswith("{"), r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads(r.stdout)
    failed: dict[str, list[str]] = {host: [] for host in CASES}
    for task in report["plays"][0]["tasks"]:
        for host, result in task["hosts"].items():
            failed[host] += [item["msg"] for item in result.get("results", []) if item.get("failed")]
    assert r.returncode == (2 if any(expected for _, expected in CASES.values()) else 0), r.stderr
    assert {h for h, s in report["stats"].items() if s["failures"]} == {h for h, m in failed.items() if m}
    return failed


@pytest.mark.parametrize("host", CASES)
def test_qemu_conf_check(results: dict[str, list[str]], host: str) -> None:
    expected = CASES[host][1]
    if expected is None:
        assert results[host] == []
    else:
        [message] = results[host]  # one line, for the one setting that is wrong
        assert message.startswith(f"{host}: /"), message
        assert message.endswith(f"/{host}/qemu.conf: {expected} (README: Security model)"), message
