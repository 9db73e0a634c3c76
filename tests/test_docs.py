"""
The documents say what the code does: every example message in
docs/protocol.md decodes, and every configuration key is in the README.
"""

from pathlib import Path

import pytest

from meter import config, wire

ROOT = Path(__file__).resolve().parent.parent


def examples() -> list[bytes]:
    text = (ROOT / "docs" / "protocol.md").read_text()
    return [line.encode() for line in text.splitlines() if line.startswith("meter/1 ")]


def test_protocol_has_examples_of_every_kind():
    kinds = {line.split(b" ")[1] for line in examples()}
    assert kinds >= {b"DAY", b"DAYACK", b"BATCH", b"BATCHACK"}


@pytest.mark.parametrize("line", examples(), ids=lambda line: line[:40].decode())
def test_protocol_example_decodes_and_reencodes(line):
    assert wire.encode(wire.decode(line)) == line


@pytest.mark.parametrize(
    "section, key", [(section, key) for section, keys in config.SCHEMA.items() for key in keys]
)
def test_readme_documents_every_key(section, key):
    readme = (ROOT / "README.md").read_text()
    assert f"`{key}`" in readme, f"README.md does not document [{section}] {key}"
