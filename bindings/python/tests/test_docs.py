"""The Python example of docs/BINDINGS.md runs as written against a real homeserver."""

import pathlib
import re

from conftest import REPO, run


def python_example() -> str:
    text = (REPO / "docs" / "BINDINGS.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "docs/BINDINGS.md should have exactly one Python example"
    return blocks[0]


def test_the_python_example_in_the_docs_works(server, profiles: pathlib.Path, capsys):
    source = python_example()
    assert len(source.strip().splitlines()) <= 14
    namespace: dict = {}
    exec(compile(source, "docs/BINDINGS.md", "exec"), namespace)
    run(namespace["main"](server.address, server.certificate, str(profiles)))
    assert capsys.readouterr().out == "alice@localhost/phone: hello bob\n"
