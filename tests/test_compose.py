"""docker-compose.yml cannot run here (no Docker engine), so keep it true to the parts we own:
files it mounts exist, the Envoy bootstrap is what `bluegreen envoy-bootstrap` renders and
Envoy accepts it, the control-plane config loads, and addresses and ports agree."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from controlplane.bootstrap import render_bootstrap
from controlplane.config import parse_settings
from tests.harness import envoy_binary

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_images_are_pinned_and_mounted_files_exist() -> None:
    for name, service in COMPOSE["services"].items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    for secret in COMPOSE["secrets"].values():
        assert (ROOT / secret["file"]).is_file()


def test_envoy_bootstrap_is_the_rendered_one_and_valid(tmp_path: Path) -> None:
    path = ROOT / "envoy" / "compose-bootstrap.yaml"
    expected = render_bootstrap(node_id="edge-1", fleet="default", xds="controlplane:18000", admin_address="0.0.0.0", admin_port=9901)
    assert path.read_text() == expected, "re-render with: bluegreen envoy-bootstrap --node-id edge-1 --xds controlplane:18000 --admin-address 0.0.0.0 -o envoy/compose-bootstrap.yaml"
    check = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_control_plane_config_loads_and_ports_agree() -> None:
    raw = yaml.safe_load((ROOT / "deploy/compose/config.yaml").read_text())
    raw["admin"]["token_file"] = str(ROOT / COMPOSE["secrets"]["bluegreen_admin_token"]["file"])
    settings = parse_settings(raw)
    assert settings.admin_token
    [fleet] = settings.fleets
    published = {int(p.split(":")[-1]) for p in COMPOSE["services"]["envoy"]["ports"]}
    for listener in fleet.listeners:
        assert {listener.port, listener.preview_port} <= published
    command = COMPOSE["services"]["controlplane"]["command"]
    assert "--xds 0.0.0.0:18000" in command and "envoy/compose-bootstrap.yaml" in str(COMPOSE["services"]["envoy"]["volumes"])


def test_registered_endpoints_are_the_apps_static_addresses() -> None:
    script = (ROOT / "deploy/compose/register-demo.sh").read_text()
    registered = set(re.findall(r"(172\.28\.0\.\d+):8080", script))
    apps = {COMPOSE["services"][n]["networks"]["bluegreen"]["ipv4_address"] for n in ("app-blue", "app-green")}
    assert registered == apps
    for name in ("app-blue", "app-green"):
        assert "--port 8080" in COMPOSE["services"][name]["command"]


HA = ROOT / "deploy" / "ha"


def test_ha_compose_files_exist_and_its_bootstrap_lists_every_replica(tmp_path: Path) -> None:
    compose = yaml.safe_load((HA / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        assert ":" in service["image"] and not service["image"].endswith(":latest"), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (HA / source).exists(), f"{name} mounts missing {source}"
    assert (HA / compose["secrets"]["bluegreen_admin_token"]["file"]).is_file()
    raw = yaml.safe_load((HA / "config.yaml").read_text())
    raw["admin"]["token_file"] = str(HA / compose["secrets"]["bluegreen_admin_token"]["file"])
    assert parse_settings(raw).tokens()
    replicas = [n for n in compose["services"] if n.startswith("cp-")]
    expected = render_bootstrap(node_id="edge-1", fleet="default", xds=[f"{r}:18000" for r in replicas],
                                admin_address="0.0.0.0", admin_port=9901)
    path = HA / "envoy-bootstrap.yaml"
    assert path.read_text() == expected, ("re-render with: bluegreen envoy-bootstrap --node-id edge-1 --xds cp-1:18000 "
                                          "--xds cp-2:18000 --xds cp-3:18000 --admin-address 0.0.0.0 -o deploy/ha/envoy-bootstrap.yaml")
    check = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
