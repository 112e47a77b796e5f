from pathlib import Path
from typing import Any

import pytest

from agent.errors import InputError
from agent.seed import new_ed25519
from agent.spec import load_spec, parse_spec

pytestmark = pytest.mark.unit

KEY = new_ed25519("alice@laptop").public


def vm(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "web-1", "owner": "alice", "image": "tiny-1.*", "ssh_keys": [KEY]}
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def test_minimal_spec_and_defaults() -> None:
    spec = parse_spec({"vms": [vm()]})
    v = spec.vms[0]
    assert (v.cpus, v.memory, v.data_disk, v.network.mode, v.health.timeout) == (1, 256, 0, "user", 120.0)
    assert v.track.family == 1 and not v.track.pinned
    assert v.digest() == parse_spec({"vms": [vm()]}).vms[0].digest()
    assert v.digest() != parse_spec({"vms": [vm(memory=512)]}).vms[0].digest()


@pytest.mark.parametrize("override,field", [
    ({"name": "Web"}, "vms[0].name"),
    ({"name": "a" * 64}, "vms[0].name"),
    ({"name": "web_1"}, "vms[0].name"),
    ({"name": "-web"}, "vms[0].name"),
    ({"name": "<x/>"}, "vms[0].name"),
    ({"name": ...}, "vms[0].name"),
    ({"owner": "Al ice"}, "vms[0].owner"),
    ({"image": "tiny"}, "vms[0].image"),
    ({"image": "tiny-1.x"}, "vms[0].image"),
    ({"cpus": 0}, "vms[0].cpus"),
    ({"cpus": "2"}, "vms[0].cpus"),
    ({"cpus": 1000}, "vms[0].cpus"),
    ({"memory": -1}, "vms[0].memory"),
    ({"memory": 10**12}, "vms[0].memory"),
    ({"data_disk": -5}, "vms[0].data_disk"),
    ({"ssh_keys": []}, "vms[0].ssh_keys"),
    ({"ssh_keys": ["not a key"]}, "vms[0].ssh_keys"),
    ({"ssh_keys": ['command="rm -rf /" ' + KEY]}, "vms[0].ssh_keys"),
    ({"ssh_keys": [KEY + "\nssh-ed25519 AAAA evil"]}, "vms[0].ssh_keys"),
    ({"ssh_keys": ["ssh-ed25519 AAAAnotbase64key"]}, "vms[0].ssh_keys"),
    ({"network": {"mode": "tap"}}, "vms[0].network.mode"),
    ({"network": {"mode": "user", "bridge": "br0"}}, "vms[0].network"),
    ({"network": {"mode": "network"}}, "vms[0].network"),
    ({"network": {"mode": "network", "bridge": "br0; reboot"}}, "vms[0].network.bridge"),
    ({"health": {"timeout": 0}}, "vms[0].health.timeout"),
    ({"disk": "/etc/shadow"}, "vms[0].disk"),
    ({"qemu_args": ["-device", "x"]}, "vms[0].qemu_args"),
])
def test_invalid_fields_are_named(override: dict[str, Any], field: str) -> None:
    with pytest.raises(InputError) as e:
        parse_spec({"vms": [vm(**override)]}, "spec.yaml")
    assert e.value.message.startswith(f"spec.yaml: {field}:"), e.value.message
    assert "\n" not in e.value.message


def test_duplicate_names() -> None:
    with pytest.raises(InputError, match=r"vms\[1\].name: duplicate VM name 'web-1'"):
        parse_spec({"vms": [vm(), vm(owner="bob")]})


def test_spec_must_be_a_mapping(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="a spec is a mapping"):
        load_spec(f)
    f.write_text("vms: [\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_spec(f)
    with pytest.raises(InputError, match="cannot read spec"):
        load_spec(tmp_path / "missing.yaml")


def test_network_mode() -> None:
    v = parse_spec({"vms": [vm(network={"mode": "network", "bridge": "br0"})]}).vms[0]
    assert v.network.bridge == "br0"
