"""MkDocs hook: writes the reference pages from the code at every build, so they cannot drift from it.

- `reference/cli.md`: every command, argument and option of `slimctl` (`slimserve.client.cli:app`) and of
  `slimserve` (`slimserve.server.cli:app`), read from their click command trees;
- `reference/settings.md`: `Settings` of `server/settings.py` (its own `settings_table()`), flag and variable;
- `reference/grpc.md`: services, RPCs, messages and enums of `protos/*.proto`, with their comments, read from a
  descriptor set that protoc (grpcio-tools) builds with source info;
- `deploy.md`: `deploy/README.md`, the deployment guide, kept where it is and copied in.

The page functions are plain (no MkDocs objects), so tests/test_docs.py calls them directly.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = {
    "reference/cli.md": "cli_page",
    "reference/settings.md": "settings_page",
    "reference/grpc.md": "grpc_page",
    "deploy.md": "deploy_page",
}


# ------------------------------------------------------------------------------------------------------ CLI


def click_command(app_path: str):
    """The click command tree of a typer app named as `module:attribute` (typer's own click, `typer.main.get_command`)."""
    import importlib

    import typer

    module, attribute = app_path.split(":")
    return typer.main.get_command(getattr(importlib.import_module(module), attribute))


def walk(command, path: tuple[str, ...], parent=None) -> Iterator[tuple[tuple[str, ...], object, object]]:
    """Every command under `command` (itself first) with its click context, groups before their subcommands,
    in declaration order."""
    ctx = command.context_class(command, info_name=path[-1], parent=parent)
    yield path, command, ctx
    for name, sub in getattr(command, "commands", {}).items():
        if not sub.hidden:
            yield from walk(sub, (*path, name), ctx)


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def command_section(path: tuple[str, ...], command, ctx) -> list[str]:
    """One command as its `--help` says it: the help text, the usage line, and each parameter's help record
    (what `--help` prints for it, default, environment variable and [required] included) as a table row."""
    level = "#" * min(len(path) + 1, 4)
    out = [f"{level} `{' '.join(path)}`", ""]
    if command.help:
        out += [command.help.split("\f")[0].strip(), ""]
    usage = " ".join(command.collect_usage_pieces(ctx))
    out += ["```", f"{' '.join(path)} {usage}".rstrip(), "```", ""]
    params = [p for p in command.get_params(ctx) if p.name != "help" and not p.hidden]
    if params:
        out += ["| argument or option | meaning |", "| --- | --- |"]
        for param in params:
            record = param.get_help_record(ctx)
            name, meaning = record if record else (param.name, "")
            kind = " (argument)" if param.param_type_name == "argument" else ""
            out.append(f"| `{cell(name)}`{kind} | {cell(meaning)} |")
        out.append("")
    subs = [(n, c) for n, c in getattr(command, "commands", {}).items() if not c.hidden]
    if subs:
        out += ["| command | what it does |", "| --- | --- |"]
        out += [f"| [`{n}`](#{anchor((*path, n))}) | {cell(c.get_short_help_str(limit=300))} |" for n, c in subs]
        out.append("")
    return out


def anchor(path: tuple[str, ...]) -> str:
    """The id MkDocs' toc extension gives the heading `` `a b c` ``."""
    return "-".join(path)


def cli_commands(app_path: str, name: str) -> list[str]:
    """Every command of the app as its reader types it, e.g. `slimctl rollout start`."""
    return [" ".join(path) for path, _, _ in walk(click_command(app_path), (name,))]


def cli_page() -> str:
    out = [
        "# CLI reference",
        "",
        "Generated from the typer apps at every build of this site (`docs/hooks/reference.py`): what `--help` prints,",
        "as tables. `slimctl` talks to a running server; `slimserve` runs one (its `start` flags are also the",
        "[settings](settings.md), each with its `SLIMSERVE_*` variable). Exit status 0 on success, non-zero with a",
        "one-line reason on stderr otherwise.",
        "",
    ]
    for app_path, name in (("slimserve.client.cli:app", "slimctl"), ("slimserve.server.cli:app", "slimserve")):
        for path, command, ctx in walk(click_command(app_path), (name,)):
            out += command_section(path, command, ctx)
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ settings


def settings_page() -> str:
    from slimserve.server.settings import settings_table

    return "\n".join(
        [
            "# Server settings",
            "",
            "Generated from `Settings` in `server/settings.py` at every build of this site: that one declaration is each",
            "flag of `slimserve start`, its environment variable `SLIMSERVE_<NAME>` (e.g. `--grpc-port` is",
            "`SLIMSERVE_GRPC_PORT`) and its default. A flag beats the variable, which beats the default. Lists take the",
            'flag once per value, or JSON in the variable (`SLIMSERVE_PREFERRED_BATCH_SIZES="[4, 8]"`).',
            "",
            "Flags of `slimserve start`, each also an environment variable `SLIMSERVE_<NAME>`:",
            "",
            settings_table(),
            "What these settings mean together in production (TLS, replicas, scaling): [Operations](../operations.md).",
            "",
        ]
    )


# ---------------------------------------------------------------------------------------------------- gRPC


def descriptor_set():
    """protos/*.proto compiled by protoc with their comments (FileDescriptorSet), as protos/generate.py includes them."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    protos = sorted((ROOT / "protos").glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "include"
        (tree / "slimserve").mkdir(parents=True)
        (tree / "slimserve" / "protos").symlink_to(ROOT / "protos", target_is_directory=True)
        out = Path(tmp) / "set.pb"
        args = ["protoc", f"-I{tree}", f"-I{include}", "--include_source_info", f"--descriptor_set_out={out}"]
        args += [f"slimserve/protos/{p.name}" for p in protos]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc could not compile protos/*.proto: run `make proto` to see its errors")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return files


def comments(file) -> dict[tuple[int, ...], str]:
    """Leading (else trailing) comment of each element, keyed by its source-info path."""
    found = {}
    for location in file.source_code_info.location:
        text = (location.leading_comments or location.trailing_comments).strip()
        if text:
            found[tuple(location.path)] = " ".join(line.strip() for line in text.splitlines())
    return found


# FileDescriptorProto / DescriptorProto / ServiceDescriptorProto field numbers, as source-info paths use them
MESSAGE, ENUM, SERVICE = 4, 5, 6
FIELD, NESTED, NESTED_ENUM, METHOD, ENUM_VALUE = 2, 3, 4, 2, 2

LABELS = {1: "", 2: "required ", 3: "repeated "}


def type_name(field, package: str) -> str:
    from google.protobuf import descriptor_pb2

    if field.type_name:
        name = field.type_name.lstrip(".")
        return name.removeprefix(package + ".")
    names = {v: k for k, v in descriptor_pb2.FieldDescriptorProto.Type.items()}
    return names[field.type].removeprefix("TYPE_").lower()


def message_section(message, path: tuple[int, ...], prefix: str, package: str, notes: dict) -> list[str]:
    full = f"{prefix}{message.name}"
    if message.options.map_entry:
        return []
    out = [f"#### `{full}`", ""]
    if path in notes:
        out += [notes[path], ""]
    if message.field:
        out += ["| field | number | type | meaning |", "| --- | --- | --- | --- |"]
        for i, field in enumerate(message.field):
            label = LABELS.get(field.label, "")
            nested_map = _map_entry(message, field)
            shown = f"map<{nested_map}>" if nested_map else f"{label}{type_name(field, package)}"
            if field.HasField("oneof_index") and not field.proto3_optional:
                shown += f" (oneof `{message.oneof_decl[field.oneof_index].name}`)"
            out.append(f"| `{field.name}` | {field.number} | `{shown}` | {cell(notes.get((*path, FIELD, i), ''))} |")
        out.append("")
    else:
        out += ["No fields.", ""]
    for i, enum in enumerate(message.enum_type):
        out += enum_section(enum, (*path, NESTED_ENUM, i), f"{full}.", notes)
    for i, nested in enumerate(message.nested_type):
        out += message_section(nested, (*path, NESTED, i), f"{full}.", package, notes)
    return out


def _map_entry(message, field) -> str:
    if field.label != 3 or not field.type_name:
        return ""
    for nested in message.nested_type:
        if nested.options.map_entry and field.type_name.endswith("." + nested.name):
            key, value = nested.field
            return f"{type_name(key, '')}, {type_name(value, '')}"
    return ""


def enum_section(enum, path: tuple[int, ...], prefix: str, notes: dict) -> list[str]:
    out = [f"#### `{prefix}{enum.name}` (enum)", ""]
    if path in notes:
        out += [notes[path], ""]
    out += ["| value | number | meaning |", "| --- | --- | --- |"]
    out += [f"| `{v.name}` | {v.number} | {cell(notes.get((*path, ENUM_VALUE, i), ''))} |" for i, v in enumerate(enum.value)]
    return [*out, ""]


def grpc_page() -> str:
    files = descriptor_set()
    out = [
        "# gRPC API reference",
        "",
        "Generated from `protos/*.proto` at every build of this site (`docs/hooks/reference.py`), with the comments",
        "of the sources. `inference.GRPCInferenceService` keeps the Open Inference Protocol's package, service name",
        "and field numbers, with Triton's extensions ([Triton and KServe compatibility](../guides/triton-kserve.md));",
        "`slimserve.v1` is slimserve's own management API. Standard services: `grpc.health.v1.Health` and server",
        "reflection.",
        "",
    ]
    for file in files.file:
        notes = comments(file)
        out += [f"## `{Path(file.name).name}` (package `{file.package}`)", ""]
        if (header := _file_comment(file)) is not None:
            out += [header, ""]
        for s, service in enumerate(file.service):
            out += [f"### service `{file.package}.{service.name}`", ""]
            if (SERVICE, s) in notes:
                out += [notes[(SERVICE, s)], ""]
            out += ["| RPC | request | response | meaning |", "| --- | --- | --- | --- |"]
            for m, method in enumerate(service.method):
                request = ("stream " if method.client_streaming else "") + type_name_of(method.input_type, file.package)
                response = ("stream " if method.server_streaming else "") + type_name_of(method.output_type, file.package)
                note = cell(notes.get((SERVICE, s, METHOD, m), ""))
                out.append(f"| `{method.name}` | `{request}` | `{response}` | {note} |")
            out.append("")
        if file.message_type or file.enum_type:
            out += [f"### messages of `{Path(file.name).name}`", ""]
        for e, enum in enumerate(file.enum_type):
            out += enum_section(enum, (ENUM, e), "", notes)
        for m, message in enumerate(file.message_type):
            out += message_section(message, (MESSAGE, m), "", file.package, notes)
    return "\n".join(out)


def type_name_of(name: str, package: str) -> str:
    return name.lstrip(".").removeprefix(package + ".")


def _file_comment(file) -> str | None:
    """The comment above `syntax = ...` (source path [12]), the file's own description."""
    for location in file.source_code_info.location:
        if tuple(location.path) == (12,) and location.leading_detached_comments:
            return " ".join(" ".join(line.strip() for line in c.strip().splitlines()) for c in location.leading_detached_comments)
        if tuple(location.path) == (12,) and location.leading_comments:
            return " ".join(line.strip() for line in location.leading_comments.strip().splitlines())
    return None


# -------------------------------------------------------------------------------------------------- deploy


def deploy_page() -> str:
    text = (ROOT / "deploy" / "README.md").read_text()
    note = "\n\n*This page is `deploy/README.md`, copied in when the site is built: edit it there.*\n"
    first_break = text.index("\n")
    return text[:first_break] + note + text[first_break:]


# ------------------------------------------------------------------------------------------------ the hook


def on_files(files, config):
    """Adds the generated pages to the site (MkDocs >= 1.6 `File.generated`): nothing is written into docs/."""
    from mkdocs.structure.files import File

    for src_uri, function in PAGES.items():
        files.append(File.generated(config, src_uri, content=globals()[function]()))
    return files
