"""jsonargparse's and argparse's errors as one sentence: which key, which class, what is wrong,
and the closest option when one was misspelt (the ``flowmap fit``/``validate`` error path)."""

from __future__ import annotations

import argparse
import contextvars
import difflib
import importlib
import re
from typing import Any

from flowmap.apps.help import component_groups, init_parameters
from flowmap.apps.kit import TRAINER_COMMANDS

__all__ = ["CURRENT_COMMAND", "one_sentence", "unrecognized", "yaml_sentence"]

#: The LightningCLI subcommand being parsed (``fit``/``validate``), for the sentences' hints.
CURRENT_COMMAND: contextvars.ContextVar[str] = contextvars.ContextVar("flowmap_command", default="")


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _init_params(cls: type) -> list[str]:
    return list(init_parameters(cls))


def _family(cls: type) -> list[type]:
    """The flowmap classes that can take ``cls``'s place (the other models, nets, losses or data)."""
    for group in component_groups():
        if cls in group.classes:
            return group.classes
    return []


def _suggestion(class_path: str | None, option: str) -> str:
    """ "; did you mean 'x'? It takes a, b, c" for an option a class does not take, or the class of
    the same family (model, net, loss, data) that takes it."""
    if not class_path:
        return ""
    try:
        cls = _import(class_path)
        names = _init_params(cls)
    except (ImportError, AttributeError, ValueError, TypeError):
        return ""
    name = cls.__name__
    option = option.split(".")[0]  # 'loss.teacher_max_gap': the class lacks 'loss'
    close = difflib.get_close_matches(option, names, n=1)
    if close:
        return f"; did you mean {close[0]!r}? {name} takes {', '.join(names)}"
    for other in _family(cls):
        if other is cls:
            continue
        there = difflib.get_close_matches(option, _init_params(other), n=1)
        if there:
            return (
                f"; did you mean {there[0]!r}? It is an option of {other.__name__}, not of "
                f"{name}, which takes {', '.join(names)}"
            )
    return f"; {name} takes {', '.join(names)}"


def yaml_sentence(text: str) -> str:
    """``Problems parsing config: <PyYAML's multi-line report>`` → ``line L, column C: problem``."""
    marks = re.findall(r'in "([^"]*)", line (\d+), column (\d+)', text)
    body = re.sub(r'\s*in "[^"]*", line \d+, column \d+', "", text)
    body = body.replace("Problems parsing config:", "").strip()
    parts = [p.strip() for p in body.splitlines() if p.strip()]
    problem = parts[-1] if parts else body
    # PyYAML notices a missing ':' or ']' on a later line; its first mark is where the
    # construct in trouble starts, the line to fix
    where = f"line {marks[0][1]}, column {marks[0][2]}" if marks else ""
    if len(marks) > 1 and marks[-1][1] != marks[0][1]:
        where += f" (noticed at line {marks[-1][1]})"
    return f"YAML syntax error at {where}: {problem}" if where else f"YAML syntax error: {problem}"


_TYPE_WORDS = {"float": "a number", "int": "a whole number", "NoneType": "null", "str": "text"}


def _union_sentence(text: str, given: str) -> str:
    """jsonargparse's "Does not validate against any of the Union subtypes Subtypes: [<class
    'float'>, <class 'NoneType'>] Errors:" → "expected a number or null, got 'inf'" (YAML reads
    nan and inf as text: no option of flowmap takes them)."""
    union = re.search(
        r"Does not validate against any of the Union subtypes\s*Subtypes: \[(.*?)\]", text
    )
    if not union:
        return text
    kinds = [t.rpartition(".")[2] for t in re.findall(r"<class '([\w.]+)'>", union.group(1))]
    words = [_TYPE_WORDS.get(k, k) for k in kinds]
    if "a number" in words and re.fullmatch(r"[+-]?(nan|inf\w*)", given, re.I):
        words[words.index("a number")] = "a finite number"
    return text[: union.start()] + f"expected {' or '.join(words)}, got {given!r}"


def one_sentence(message: str) -> str:
    """Boil a (nested, multi-line) jsonargparse error down to the innermost problem, in one line:
    which key, which class, what is wrong, and the close option name when one was misspelt."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if message.startswith("Problems parsing config"):
        return yaml_sentence(message)
    class_paths = list(re.finditer(r"Problem with given class_path '([^']+)'", message))
    class_path = class_paths[-1].group(1) if class_paths else None
    head = message[: class_paths[-1].start()] if class_paths else message
    key = ".".join(re.findall(r'Parser key "([^"]+)"', head)) or None
    if class_path:
        problem = f"Problem with given class_path '{class_path}'"
        start = max(i for i, ln in enumerate(lines) if problem in ln)
        detail = []
        for ln in lines[start + 1 :]:
            if ln.startswith("- ") or ln.startswith("Given value"):
                break
            detail.append(ln.rstrip(":") if ln.startswith("Parser key") else ln)
        text = " ".join(detail) or lines[-1]
        given = next((ln for ln in lines[start + 1 :] if ln.startswith("Given value:")), "")
        text = _union_sentence(text, given.partition(":")[2].strip())
        where = f"{key} ({class_path})" if key else class_path
    else:
        text, where = " ".join(lines[:2]), None
    option = re.search(r"(?:Option|Key) '([^']+)' is not accepted", text)
    if option:
        text = (
            f"option {option.group(1)!r} is not accepted{_suggestion(class_path, option.group(1))}"
        )
    if "Problems parsing config" in text:  # a YAML file given as the value of a nested key
        text = yaml_sentence(text[text.index("Problems parsing config") :])
    nan = re.search(r"Expected a <class 'float'>\. Got value: ([+-]?(?:nan|inf)\w*)", text, re.I)
    if nan:
        text = text[: nan.start()] + f"must be a finite number, got {nan.group(1)}"
    text = re.sub(r'Parser key "([^"]+)":?', r"\1:", text)
    text = text.replace("::", ":")
    missing = re.match(r"config: File does not exist: (.*)", text)
    if missing:
        text = f"the --config file {missing.group(1)} does not exist; check the path"
    return f"{where}: {text}" if where else text


def _option_keys(parser: argparse.ArgumentParser) -> list[str]:
    return [o[2:] for o in parser._option_string_actions if o.startswith("--")]


def _closest_key(key: str, keys: list[str]) -> str | None:
    """The valid option closest to a misspelt one: the whole dotted key, else its first part."""
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    if close:
        return close[0]
    root, dot, rest = key.partition(".")
    roots = sorted({k.split(".")[0] for k in keys})
    close = difflib.get_close_matches(root, roots, n=1)
    if close and close[0] != root:
        return f"{close[0]}{dot}{rest}"
    prefix = root + "."
    close = difflib.get_close_matches(
        key, [k for k in keys if k.startswith(prefix)], n=1, cutoff=0.6
    )
    return close[0] if close else None


def unrecognized(message: str, parser: argparse.ArgumentParser) -> str | None:
    """``unrecognized arguments: fit --trainer.max_stepz=3`` → a sentence with the closest key."""
    command = CURRENT_COMMAND.get()
    if command in TRAINER_COMMANDS and re.match(
        r"the following arguments are required: .*model", message
    ):
        return (
            f"`flowmap {command}` needs a recipe: --config recipes/<data>/<stage>.yaml "
            "(or --model=CLASS and --data=CLASS)"
        )
    found = re.match(r"unrecognized arguments: (.*)", message, re.S)
    if not found:
        return None
    tokens = found.group(1).split()
    if tokens and tokens[0] == command:
        tokens = tokens[1:]
    options = [t for t in tokens if t.startswith("-")]
    if not options:
        if command in TRAINER_COMMANDS:
            return (
                f"`flowmap {command}` needs a recipe: --config recipes/<data>/<stage>.yaml "
                "(or --model=CLASS and --data=CLASS)"
            )
        return f"unrecognized arguments: {' '.join(tokens)}"
    sub = _subcommand_parser(parser, command) or parser
    keys = _option_keys(sub)
    bad = options[0].split("=", 1)[0]
    close = _closest_key(bad.lstrip("-"), keys)
    hint = f"; did you mean --{close}?" if close else ""
    return f"unrecognized option {bad}{hint}"


def _subcommand_parser(parser: argparse.ArgumentParser, command: str) -> Any:
    action = getattr(parser, "_subcommands_action", None)
    return action._name_parser_map.get(command) if action is not None and command else None
