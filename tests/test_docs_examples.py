"""The example configs in the docs are real configs: each one parses with the control plane's own
parser (file paths rewritten into a temporary directory, where the files are created)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from controlplane.config import parse_settings

DOCS = Path(__file__).resolve().parent.parent / "docs"


def yaml_blocks(page: Path) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", page.read_text(), re.S)


def test_the_hardened_example_in_security_md_is_a_valid_config(tmp_path: Path) -> None:
    section = (DOCS / "security.md").read_text().split("## Hardened example config", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None, "no yaml block under 'Hardened example config'"
    text = block.group(1).replace("/etc/bluegreen/", f"{tmp_path}/")
    for path in set(re.findall(re.escape(str(tmp_path)) + r"/[\w./-]+", text)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(f"example-token-{abs(hash(path)):x}-0123456789\n")
        Path(path).chmod(0o600)
    settings = parse_settings(yaml.safe_load(text))
    assert {t.role for t in settings.tokens()} == {"viewer", "operator", "admin"}
    assert settings.xds.tls is not None and settings.xds.max_streams_per_identity == 8
    assert settings.fleet_identities == {"edge": ("spiffe://example.org/edge/*",), "internal": ("spiffe://example.org/internal/*",)}
    assert settings.allow.smoke_commands == (("/usr/local/bin/smoke-check",),)
