"""The README and the docs site: a short README that starts with the two commands and links into docs/ only to
pages that exist, and reference pages generated from the code (docs/hooks/reference.py) that list all of it."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import typer

from slimserve.client.cli import app as slimctl_app
from slimserve.protos import inference_pb2, model_config_pb2, slimserve_pb2
from slimserve.server.settings import Settings, flag_of, settings_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def load_hook():
    spec = importlib.util.spec_from_file_location("docs_reference_hook", ROOT / "docs" / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hook():
    return load_hook()


def test_the_readme_is_at_most_200_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move reference, tutorial or benchmark text into docs/"


def test_the_readme_opens_with_make_demo_and_make_test():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert first_block, "README.md has no ```bash block"
    assert text.index(first_block.group(0)) < text.index("\n## "), "the two commands come before the first section"
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands[:2] == ["make demo", "make test"], commands


def links_of(path: Path) -> list[str]:
    return [target for target in LINK.findall(path.read_text()) if not re.match(r"[a-z]+:", target)]


def test_every_link_of_the_readme_into_the_repository_exists():
    links = links_of(README)
    into_docs = [link for link in links if link.startswith("docs/")]
    assert len(into_docs) >= 8, f"the README links into the docs site: {into_docs}"
    missing = [link for link in links if not (ROOT / link.split("#")[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_every_docs_page_of_the_nav_exists_and_every_page_is_in_the_nav(hook):
    nav = (ROOT / "mkdocs.yml").read_text()
    listed = set(re.findall(r":\s+([\w/.-]+\.md)\s*$", nav, re.M))
    written = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    generated = set(hook.PAGES)
    assert listed == written | generated, (
        f"in mkdocs.yml's nav but not a page: {sorted(listed - written - generated)}; "
        f"a page missing from the nav: {sorted((written | generated) - listed)}"
    )


def test_the_cli_reference_lists_every_slimctl_command_with_each_option(hook):
    page = hook.cli_page()
    root = typer.main.get_command(slimctl_app)

    def commands(command, path):
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from commands(sub, (*path, name))

    found = list(commands(root, ("slimctl",)))
    assert {"slimctl rollout start", "slimctl traffic", "slimctl register"} <= {" ".join(p) for p, _ in found}
    for path, command in found:
        heading = f"# `{' '.join(path)}`"
        assert heading in page, f"the CLI reference has no section for `{' '.join(path)}`"
        section = page.split(heading, 1)[1].split("\n#", 1)[0]
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert f"`{param.opts[0]}" in section, f"`{' '.join(path)}` section lacks {param.opts[0]}"


def test_the_cli_reference_lists_the_slimserve_command_and_every_start_flag(hook):
    page = hook.cli_page()
    assert "## `slimserve`" in page and "### `slimserve start`" in page and "### `slimserve optimize`" in page
    start = page.split("### `slimserve start`", 1)[1].split("\n### ", 1)[0]
    for name, field in Settings.model_fields.items():
        flag = flag_of(name, field).split("/")[0]
        assert f"`{flag} " in start or f"`{flag}`" in start, f"{flag} is missing from `slimserve start`"


def test_the_settings_reference_is_the_table_rendered_from_settings(hook):
    page = hook.settings_page()
    assert settings_table() in page
    assert all(f"`{flag_of(name, field)}`" in page for name, field in Settings.model_fields.items())


def test_the_grpc_reference_lists_every_service_rpc_and_message_of_the_protos(hook):
    page = hook.grpc_page()
    for module in (inference_pb2, model_config_pb2, slimserve_pb2):
        package = module.DESCRIPTOR.package
        for service in module.DESCRIPTOR.services_by_name.values():
            assert f"### service `{package}.{service.name}`" in page
            for method in service.methods:
                assert f"| `{method.name}` |" in page, f"{service.name}.{method.name} is missing"
        for message in module.DESCRIPTOR.message_types_by_name.values():
            assert f"#### `{message.name}`" in page, f"message {package}.{message.name} is missing"
    # the comments of the sources come along
    assert "Client-streamed upload: one RegisterHeader first" in page


def test_the_deploy_page_is_the_deploy_readme(hook):
    page = hook.deploy_page()
    assert (ROOT / "deploy" / "README.md").read_text().split("\n", 1)[1] in page


def protobuf_messages_built(path: Path) -> list[str]:
    """`module.Message(...)` calls in a source file, where `module` is imported from slimserve.protos."""
    import ast

    tree = ast.parse(path.read_text())
    modules = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "slimserve.protos"
        for alias in node.names
    }
    built = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            root = node.func.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in modules and node.func.attr[:1].isupper():
                built.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node.func)}(...)")
    return built


def test_the_architecture_claim_holds_that_only_the_converters_build_protobuf_messages():
    converters = {ROOT / "server" / "grpc" / "converters.py", ROOT / "server" / "grpc" / "triton_converters.py"}
    assert all(protobuf_messages_built(path) for path in converters), "the check finds the converters' own messages"
    elsewhere = [hit for path in sorted((ROOT / "server").rglob("*.py")) if path not in converters for hit in protobuf_messages_built(path)]
    assert not elsewhere, f"docs/architecture.md says the converters build every message; these do too: {elsewhere}"


ARCHITECTURE = ROOT / "docs" / "architecture.md"
PACKAGES = ("server", "optimizer", "client", "protos")


def product_modules() -> list[str]:
    """Every module of the four folders, as `server/grpc/converters.py`: no `__init__`, no generated protobuf code."""
    return sorted(
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if path.name != "__init__.py" and "_pb2" not in path.name and "__pycache__" not in path.parts
    )


def own_test_modules(module: str) -> list[Path]:
    """Where a module's own tests live: tests/<package>/test_<name>.py, test_<room>_<name>.py, or <room>/test_<name>.py."""
    package, *rooms, file = module.split("/")
    name = file.removesuffix(".py")
    candidates = [ROOT / "tests" / package / f"test_{name}.py", ROOT / "tests" / package / Path(*rooms, f"test_{name}.py")]
    if rooms:
        candidates.append(ROOT / "tests" / package / f"test_{rooms[0]}_{name}.py")
    return [c for c in candidates if c.is_file()]


def tested_through() -> list[str]:
    """The module patterns of the 'tested through' table of docs/architecture.md; a name without its folder takes the
    folder of the name before it in its cell (`server/inference/router.py`, `store/traffic.py`)."""
    text = ARCHITECTURE.read_text()
    table = text[text.index("| modules | tested through |") :].split("\n\n")[0]
    patterns = []
    for row in table.splitlines()[2:]:
        cell = row.strip().strip("|").split("|")[0]
        package = ""
        for name in re.findall(r"`([^`]+)`", cell):
            if name.split("/")[0] in PACKAGES:
                package, name = name.split("/")[0], name.split("/", 1)[1]
            patterns.append(f"{package}/{name}")
    return patterns


def test_the_architecture_claim_holds_that_every_module_has_its_test_module_or_is_listed_as_tested_through_others():
    import fnmatch

    patterns = tested_through()
    modules = product_modules()
    stale = [p for p in patterns if not fnmatch.filter(modules, p)]
    assert not stale, f"docs/architecture.md's 'tested through' table names modules that do not exist: {stale}"
    untested = [m for m in modules if not own_test_modules(m) and not any(fnmatch.fnmatch(m, p) for p in patterns)]
    assert not untested, (
        "modules without a test module of their own (tests/<package>/test_<name>.py) that the 'tested through' table of "
        f"docs/architecture.md does not list: {untested}; add a test module, or a row saying which tests cover it"
    )


@pytest.mark.parametrize("package", ["server", "optimizer"])
def test_the_modules_directly_in_server_and_optimizer_are_the_ones_the_architecture_names_and_at_most_8(package):
    text = ARCHITECTURE.read_text()
    sentence = text[text.index(f"Directly in `{package}/`:") :].split(";")[0]
    named = set(re.findall(r"`([a-z_]+\.py)`", sentence))
    present = {p.name for p in (ROOT / package).glob("*.py") if p.name != "__init__.py"}
    assert named == present, f"docs/architecture.md names {sorted(named)} directly in {package}/, and it holds {sorted(present)}"
    assert len(present) <= 8, f"{package}/ holds {len(present)} modules directly: move some into a room"
