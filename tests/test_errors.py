"""Error codes per field, as docs/protocol.md "Errors per field" lists them: a client written from
that page alone never has to guess which code or `field` a fault gets."""

from __future__ import annotations

import pytest

from sdbridge.wire import protocol
from sdbridge.wire.protocol import Limits, ProtocolError


@pytest.mark.parametrize(
    ("entry", "code"),
    [
        ({"name": 1}, "bad_type"),
        ({"name": "ink", "weight": "0.5"}, "bad_type"),
        ({"name": "ink", "weight": True}, "bad_type"),
        ({"name": "ink", "weight": float("nan")}, "out_of_range"),
        ({"weight": 1.0}, "missing_field"),
        ({"name": "ink", "scale": 1.0}, "unknown_field"),
    ],
)
def test_every_fault_inside_a_loras_entry_names_the_field_loras(entry: dict, code: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        protocol.validate_generate({"prompt": "x", "loras": [entry]}, Limits())
    assert (refused.value.code, refused.value.field) == (code, "loras")
