"""Tenant names are limited to a documented ASCII set wherever they enter (a key's creation, `tenant_limits`):
a name outside it cannot go into a webhook's headers, so it is refused with the rule, not stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.auth import new_key
from gateway.quotas import parse_tenant_limits
from loraserve.cli import main
from core.config import Settings

REFUSED = ["团队", "équipe", "team a", "", "-team", "team\n", "a" * 201, "team/a"]


@pytest.mark.parametrize("tenant", REFUSED)
def test_a_key_for_a_tenant_name_outside_the_set_is_refused(tenant: str) -> None:
    with pytest.raises(ValueError, match=r"ASCII letters, digits and `\. _ - @ \+`"):
        new_key(tenant)


def test_names_in_the_set_are_taken() -> None:
    for tenant in ("team-a", "A.b_c@d+e", "7", "a" * 200):
        key, _ = new_key(tenant)
        assert key.tenant == tenant


def test_the_keys_command_refuses_the_name_and_stores_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = ["--data-dir", str(tmp_path / "data")]
    assert main(["keys", "create", "--tenant", "团队", *where]) == 2
    assert "a tenant name is 1 to 200 ASCII letters" in capsys.readouterr().out
    assert main(["keys", "list", *where]) == 0
    assert capsys.readouterr().out == ""


def test_tenant_limits_naming_a_tenant_outside_the_set_are_refused_at_start() -> None:
    with pytest.raises(ValueError, match="tenant_limits.*ASCII letters"):
        parse_tenant_limits(Settings(tenant_limits=json.dumps({"équipe": {"max_waiting": 1}})))
    _, limits = parse_tenant_limits(Settings(tenant_limits=json.dumps({"": {"max_waiting": 1}, "team-a": {}})))
    assert set(limits) == {"", "team-a"}
