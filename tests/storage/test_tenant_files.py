"""Which stored files a request's input may name: its tenant's, and only those that exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraserve.v1 import types_pb2
from storage.fetch import NO_SUCH_STORED_FILE, InputFetchError
from storage.object_store import LocalObjectStore, output_prefix, owned_by, tenant_folder, upload_key
from storage.tenant_files import check_stored_inputs


def test_keys_carry_their_tenant(tmp_path: Path) -> None:
    assert tenant_folder("team-a") != tenant_folder("team-b") and "team" not in tenant_folder("team-a")
    key = upload_key("team-a", "x.png")
    assert owned_by(key, "team-a") and not owned_by(key, "team-b") and not owned_by(key, "")
    assert owned_by(output_prefix("team-a", "req") + "img.png", "team-a")
    # A tenant whose name is another's folder prefix still gets a folder of its own.
    assert not owned_by(upload_key("team-ab", "x.png"), "team-a")


def test_a_stored_file_is_an_input_of_its_own_tenant_only(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path, "http://127.0.0.1:8080")
    mine = store.put(upload_key("team-a", "style.safetensors"), b"x", "application/x-safetensors").url
    output = store.put(output_prefix("team-a", "req") + "img.png", b"x", "image/png").url
    legacy = store.put("uploads/abc/old.png", b"x", "image/png").url
    gone = store.url(upload_key("team-a", "gone.png"))
    inp = types_pb2.GenerateInput(model_name="org/model", prompt="p")
    inp.loras.add(path="https://example.com/other.safetensors")
    inp.loras.add(path=mine)
    inp.controlnets.add(path="/models/cn", image_url=output)
    check_stored_inputs(inp, "team-a", store)

    def refusal(tenant: str, message: types_pb2.GenerateInput) -> str:
        with pytest.raises(InputFetchError) as caught:
            check_stored_inputs(message, tenant, store)
        assert caught.value.reason == NO_SUCH_STORED_FILE
        return caught.value.field

    assert refusal("team-b", inp) == "input.loras[1].path"
    assert refusal("", inp) == "input.loras[1].path"
    for url in (gone, legacy):
        other = types_pb2.GenerateInput(prompt="p")
        other.controlnets.add(path="/models/cn", image_url=url)
        assert refusal("team-a", other) == "input.controlnets[0].image_url"
    # Unsigned and expired forms of the URL name the same key.
    unsigned = types_pb2.GenerateInput(model_name=mine.split("?", 1)[0])
    assert refusal("team-b", unsigned) == "input.model_name"
    check_stored_inputs(unsigned, "team-a", store)
