"""The docs are code: README.md and docs/*.md may only name what exists, and their Python blocks run.

What a doc may not do (each rule is one test; a failure lists every offending line):

* name a repository path that does not exist (``ds_burst/...``, ``launch/...``, ``configs/...``, ``examples/...``,
  ``tests/...``, ``docs/...``; ``tests/x.py::test_y``; relative module files such as ``kernels/reference.py`` or
  ``triton_attn.py``, looked up under the repository, ``ds_burst/`` and its packages); link to a local file or to a
  heading anchor that does not exist;
* name a Python import that fails: ``import ds_burst...``, ``from ds_burst.x import y``, a dotted name such as
  ``ds_burst.training.losses.sequence_parallel_loss`` (module by importlib, the rest by getattr) or, inside
  backticks, one relative to the package (``core.step_plan.ring_passes``, ``core/documents.balanced_layout``);
* name a test function (```test_...``` in backticks) that no file of tests/ defines;
* show a command whose ``python -m MODULE`` does not exist, whose script does not exist, or whose ``--flags`` the
  script's (or ``python -m ds_burst.plan``'s) argparse does not accept. The accepted flags are read from the
  ``--help`` output of every launch/ and examples/ script and of ``ds_burst.plan`` and its subcommands, in one
  subprocess, cached in pytest's cache under a hash of the sources;
* contain a ```` ```python ```` block in README.md or docs/DEEPSPEED.md that does not run. Each such block is
  preceded by ``<!-- snippet: world=N setup=NAME[,NAME] -->`` (run as written on N spawned gloo ranks, default 1,
  after the named setups put their inputs in the block's namespace) or ``<!-- snippet: skip (reason) -->``; a
  block without that comment fails. The setups only make inputs (tensors, a tiny model saved to disk, a
  DeepSpeed config dict, a dataset): what a block does with them is the block's own code.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from dist_utils import run_ranks

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: the documents whose Python blocks must run
SNIPPET_DOCS = [ROOT / "README.md", ROOT / "docs" / "DEEPSPEED.md"]
TOP_DIRS = ("ds_burst", "launch", "configs", "examples", "tests", "docs")
PACKAGES = ("core", "kernels", "dist", "ring", "attention", "training", "integrations", "cli")
#: files of other projects that the docs name, and where they are (checked to exist where installed)
EXTERNAL_FILES = {
    "runtime/zero/parameter_offload.py": "deepspeed",
    "runtime/engine.py": "deepspeed",
    "runtime/zero/stage_1_and_2.py": "deepspeed",
    "runtime/zero/stage3.py": "deepspeed",
    "launch.py": "deepspeed/launcher",
    "megatron/model/transformer.py": None,  # Megatron-DeepSpeed: not installed here
    "pretrain_gpt.py": None,  # Megatron-DeepSpeed
}


def _repo_path(path: Path) -> str:
    """``path`` relative to the repository root."""
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------------------------------------------------------
# Reading a Markdown file: fenced blocks, indented blocks, prose (with its inline code spans)


@dataclass
class Block:
    """A fenced code block: its language, first line number (of the code) and text, and the comment before it."""

    lang: str
    line: int
    text: str
    comment: str | None


@dataclass
class Doc:
    """A Markdown file: its text, its fenced blocks and its prose."""

    path: Path
    text: str
    blocks: list[Block]
    #: the text with fenced blocks blanked out (line numbers kept)
    prose: str

    @property
    def name(self) -> str:
        """The file's path in the repository."""
        return _repo_path(self.path)

    def line_of(self, offset: int) -> int:
        """Line number of a character offset into ``text``."""
        return self.text.count("\n", 0, offset) + 1

    def prose_line_of(self, offset: int) -> int:
        """Line number of a character offset into ``prose`` (which keeps the lines, not the offsets)."""
        return self.prose.count("\n", 0, offset) + 1


_FENCE = re.compile(r"^```(\w*)\s*$")
_SNIPPET_COMMENT = re.compile(r"^<!--\s*snippet:(.*?)-->\s*$")


@cache
def read_doc(path: Path) -> Doc:
    """The parsed file (once per session)."""
    return parse_doc(path, path.read_text())


def parse_doc(path: Path, text: str) -> Doc:
    """Split a Markdown text into fenced blocks (with the snippet comment before each) and prose."""
    lines = text.split("\n")
    blocks, prose, i = [], [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        k = i - 1  # the comment may be separated from the fence by blank lines
        while k >= 0 and not lines[k].strip():
            k -= 1
        c = _SNIPPET_COMMENT.match(lines[k].strip()) if k >= 0 else None
        blocks.append(Block(m.group(1), i + 2, "\n".join(lines[i + 1 : j]), c.group(1).strip() if c else None))
        prose += [""] * (min(j, len(lines) - 1) - i + 1)
        i = j + 1
    return Doc(path, "\n".join(lines), blocks, "\n".join(prose))


def code_spans(doc: Doc) -> Iterator[tuple[int, str]]:
    """(line, text) of every inline code span of the prose (a span may wrap over lines)."""
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", doc.prose):
        yield doc.prose_line_of(m.start()), " ".join(m.group(1).split())


def indented_blocks(doc: Doc) -> Iterator[tuple[int, str]]:
    """(line, text) of every 4-space indented code block of the prose (after a blank line, not in a list)."""
    lines = doc.prose.split("\n")
    i = 0
    while i < len(lines):
        if lines[i].startswith("    ") and lines[i].strip() and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            yield i + 1, "\n".join(x[4:] for x in lines[i:j])
            i = j
        else:
            i += 1


def _all_docs() -> list[Doc]:
    """README.md and docs/*.md, parsed."""
    return [read_doc(p) for p in DOCS]


def _report(problems: list[str]) -> None:
    """Fail with every problem, sorted by file and line."""
    problems = sorted(problems, key=lambda p: (p.split(":")[0], int(p.split(":")[1])))
    if problems:
        pytest.fail(f"{len(problems)} stale reference(s) in the docs:\n" + "\n".join(problems), pytrace=False)


# ---------------------------------------------------------------------------------------------------------------
# Paths, links and test names


@cache
def _test_functions(path: Path) -> frozenset[str]:
    """Names of the functions a test file defines."""
    tree = ast.parse(path.read_text(), str(path))
    return frozenset(n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


@cache
def _all_test_functions() -> frozenset[str]:
    """Names of the functions the files of tests/ define."""
    return frozenset().union(*(_test_functions(p) for p in (ROOT / "tests").glob("*.py")))


@cache
def _files_named(name: str) -> tuple[Path, ...]:
    """Files of that name in the repository's code directories."""
    return tuple(p for top in ("ds_burst", "launch", "tests", "examples") for p in (ROOT / top).rglob(name))


def _external(rel: str) -> str | None:
    """``None`` if ``rel`` is a known file of another project that exists where that project is installed."""
    if rel not in EXTERNAL_FILES:
        return "not found"
    where = EXTERNAL_FILES[rel]
    if where is None:
        return None
    top, _, sub = where.partition("/")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(spec.submodule_search_locations[0]) / sub
    return None if (base / Path(rel).name if "/" not in rel else base / rel).exists() else f"not in {where}"


def _check_path(ref: str) -> str | None:
    """``None`` if the repository path ``ref`` (maybe a glob, maybe with ``::test_name[param]``) exists."""
    ref, _, test = ref.partition("::")
    ref = ref.rstrip("/")
    hits = sorted(ROOT.glob(ref)) if "*" in ref else ([ROOT / ref] if (ROOT / ref).exists() else [])
    if not hits:
        return "no such path"
    if test:
        name = test.split("[")[0]
        if hits[0].suffix != ".py" or name not in _test_functions(hits[0]):
            return f"{ref} defines no {name}"
    return None


def _check_relative_py(ref: str) -> str | None:
    """A ``.py`` file named without its top directory: under the repository root, ds_burst/, launch/ or tests/,
    or (a bare file name) anywhere in the repository's packages; else a known file of another project."""
    path, _, test = ref.partition("::")
    for base in (ROOT, ROOT / "ds_burst", ROOT / "launch", ROOT / "tests"):
        if (base / path).exists():
            return _check_path(_repo_path(base / path) + ("::" + test if test else ""))
    if "/" not in path and _files_named(path):
        return None
    return _external(path)


_TOP_PATH = re.compile(r"(?<![\w./$~-])((?:" + "|".join(TOP_DIRS) + r")/[\w.*/-]*(?:::[\w\[\]-]+)?)")
_PY_PATH = re.compile(r"(?<![\w./$~-])([\w-]+(?:/[\w-]+)*\.py(?:::\w+)?)\b")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@cache
def _anchors(path: Path) -> frozenset[str]:
    """The heading anchors of a Markdown file."""
    return frozenset(_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", read_doc(path).prose, re.M))


def path_problems(doc: Doc) -> list[str]:
    """Repository paths (top-level directories, relative ``.py`` files, ``file::test``) that do not exist."""
    problems = []
    for m in _TOP_PATH.finditer(doc.text):
        ref = m.group(1).rstrip(".,;:)")
        why = _check_path(ref)
        if why:
            problems.append(f"{doc.name}:{doc.line_of(m.start())}: {ref}: {why}")
    for m in _PY_PATH.finditer(doc.text):
        ref = m.group(1)
        if ref.startswith(tuple(d + "/" for d in TOP_DIRS)):
            continue
        why = _check_relative_py(ref)
        if why:
            problems.append(f"{doc.name}:{doc.line_of(m.start())}: {ref}: {why}")
    return problems


def link_problems(doc: Doc) -> list[str]:
    """Markdown links to local files or headings that do not exist."""
    problems = []
    for m in _LINK.finditer(doc.prose):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.path.parent / file).resolve() if file else doc.path
        where = f"{doc.name}:{doc.prose_line_of(m.start())}: ({target})"
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            problems.append(f"{where}: no heading #{anchor} in {_repo_path(dest)}")
    return problems


def named_test_problems(doc: Doc) -> list[str]:
    """Test functions named in backticks that no file of tests/ defines."""
    problems = []
    for line, span in code_spans(doc):
        for m in re.finditer(r"(?<![\w:.])(test_\w+)(?![\w.])", span):
            if m.group(1) not in _all_test_functions():
                problems.append(f"{doc.name}:{line}: {m.group(1)}: no such test function in tests/")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Python names and imports


def _resolve(dotted: str) -> str | None:
    """``None`` if ``dotted`` (``ds_burst.x.y.attr``) imports: the longest module prefix by importlib, the rest by
    getattr; else why not."""
    parts = dotted.split(".")
    obj, i = None, len(parts)
    while i > 0:
        name = ".".join(parts[:i])
        try:
            if importlib.util.find_spec(name) is not None:
                obj = importlib.import_module(name)
                break
        except ModuleNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - a module that fails to import is the finding
            return f"importing {name} raises {type(exc).__name__}: {exc}"
        i -= 1
    if obj is None:
        return "no such module"
    for attr in parts[i:]:
        if not hasattr(obj, attr):
            return f"{'.'.join(parts[:i])} has no {attr}"
        obj = getattr(obj, attr)
        i += 1
    return None


_DOTTED = re.compile(r"(?<![\w.])(ds_burst(?:\.\w+)+)")
_FROM_IMPORT = re.compile(r"from\s+(ds_burst[\w.]*)\s+import\s+\(?([\w\s,]+)")
_IMPORT = re.compile(r"^\s*import\s+(.+)$", re.M)
_RELATIVE = re.compile(r"^((?:" + "|".join(PACKAGES) + r")(?:[./]\w+)+)(?:\(.*\))?$")


def name_problems(doc: Doc) -> list[str]:
    """ds-burst imports and dotted names that do not resolve."""
    problems = []
    refs: list[tuple[int, str]] = []
    for m in _DOTTED.finditer(doc.text):
        refs.append((doc.line_of(m.start()), m.group(1)))
    for m in _FROM_IMPORT.finditer(doc.text):
        for name in m.group(2).split("\n")[0].split(","):
            name = name.split(" as ")[0].strip()
            if re.fullmatch(r"\w+", name):
                refs.append((doc.line_of(m.start()), f"{m.group(1)}.{name}"))
    for m in _IMPORT.finditer(doc.text):
        for name in m.group(1).split(","):
            name = name.split(" as ")[0].strip()
            if name.startswith("ds_burst"):
                refs.append((doc.line_of(m.start()), name))
    for line, span in code_spans(doc):
        rm = _RELATIVE.match(span)
        # core.step_plan.ring_passes, core/documents.balanced_layout: relative to the package (files: above)
        if rm and not re.search(r"\.(py|md|json|png|log|txt|sh)$", rm.group(1)):
            refs.append((line, "ds_burst." + rm.group(1).replace("/", ".")))
    for line, ref in refs:
        why = _resolve(ref)
        if why:
            problems.append(f"{doc.name}:{line}: {ref}: {why}")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Commands: modules, scripts and their flags

#: ``python -m`` modules whose flags are checked, with their subcommands
FLAG_MODULES = {"ds_burst.plan": ("calibrate", "project", "validate")}
_HELP_SCRIPT = r"""
import contextlib, io, json, os, runpy, sys
out = {}
for key in json.loads(sys.argv[1]):
    kind, target, *sub = key.split(" ")
    buf = io.StringIO()
    saved = list(sys.path)
    if kind == "script":
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    sys.argv = [target, *sub, "--help"]
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            if kind == "script":
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    except Exception as exc:
        buf.write(f"\nERROR {type(exc).__name__}: {exc}")
    sys.path[:] = saved
    out[key] = buf.getvalue()
print(json.dumps(out))
"""


def _help_keys() -> list[str]:
    """What to ask for ``--help``: every launch/ and examples/ script, ``ds_burst.plan`` and its subcommands."""
    keys = [f"script {_repo_path(p)}" for top in ("launch", "examples") for p in sorted((ROOT / top).glob("*.py"))
            if "__main__" in p.read_text()]
    for mod, subs in FLAG_MODULES.items():
        keys += [f"module {mod}", *(f"module {mod} {s}" for s in subs)]
    return keys


def _sources_hash() -> str:
    """A hash of every Python file the ``--help`` outputs can depend on (the cache key)."""
    h = hashlib.sha256()
    for top in ("ds_burst", "launch", "examples"):
        for p in sorted((ROOT / top).rglob("*.py")):
            h.update(_repo_path(p).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def accepted_flags(request: pytest.FixtureRequest) -> dict[str, set[str]]:
    """``--flags`` in the ``--help`` output of every launch/ and examples/ script and of ``ds_burst.plan``
    (and its subcommands), from one subprocess; cached in pytest's cache under a hash of the sources."""
    cache = getattr(request.config, "cache", None)
    key, digest = "ds_burst/docs_help", _sources_hash()
    stored = cache.get(key, None) if cache is not None else None
    if stored and stored.get("hash") == digest:
        helps = stored["help"]
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-c", _HELP_SCRIPT, json.dumps(_help_keys())], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        helps = json.loads(proc.stdout.strip().split("\n")[-1])
        if cache is not None:
            cache.set(key, {"hash": digest, "help": helps})
    flags = {}
    for k, text in helps.items():
        assert "usage:" in text, f"{k} --help printed no usage:\n{text[-2000:]}"
        # the option column of argparse's listing: "  -h, --help", "  --seq SEQ      help text"
        columns = [m.group(1) for m in re.finditer(r"^ +(-[^ ].*?)(?: {2,}|$)", text, re.M)]
        flags[k] = {f for c in columns for f in re.findall(r"(?<![\w-])(--[a-zA-Z][\w-]*)", c)}
    return flags


def command_units(doc: Doc) -> Iterator[tuple[int, str]]:
    """(line, command) for every shell command the doc shows: lines of non-Python fenced blocks and of indented
    blocks (backslash continuations joined) and inline code spans; split at ``&&``, ``||``, ``;`` and ``|``,
    comments dropped."""
    texts = [(b.line, b.text) for b in doc.blocks if b.lang not in ("python", "json")]
    texts += list(indented_blocks(doc)) + list(code_spans(doc))
    for line, text in texts:
        logical, start, buf = [], line, ""
        for i, raw in enumerate(text.split("\n")):
            if not buf:
                start = line + i
            if raw.rstrip().endswith("\\"):
                buf += raw.rstrip()[:-1] + " "
                continue
            logical.append((start, buf + raw))
            buf = ""
        if buf:
            logical.append((start, buf))
        for n, cmd in logical:
            cmd = re.sub(r"(^|\s)#.*$", "", cmd)
            for part in re.split(r"&&|\|\||;|\|", cmd):
                if part.strip():
                    yield n, part.strip()


_LAUNCHERS = ("python", "python3", "torchrun", "deepspeed")


def _parse_command(cmd: str) -> tuple[str, str, list[str]] | None:
    """``("module"|"script", target, arguments)`` of a python/torchrun/deepspeed command, else ``None``."""
    try:
        words = shlex.split(cmd)
    except ValueError:
        words = cmd.split()
    while words and re.match(r"^\w+=", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words or Path(words[0]).name not in _LAUNCHERS:
        return None
    for i, w in enumerate(words[1:], 1):
        if w == "-m" and i + 1 < len(words):
            return "module", words[i + 1], words[i + 2 :]
        if w.endswith(".py") and not w.startswith("-"):
            return "script", w, words[i + 1 :]
    return None


def _flags(args: list[str]) -> list[str]:
    """The ``--flags`` among a command's arguments (``[--flag`` of an optional one, ``--flag=value``)."""
    return [a.strip("[]").split("=")[0] for a in args if re.match(r"^\[?--[a-zA-Z]", a)]


def command_problems(doc: Doc, accepted_flags: dict[str, set[str]]) -> list[str]:
    """Commands whose module or script does not exist, or that pass flags the script does not accept."""
    problems = []
    for line, cmd in command_units(doc):
        parsed = _parse_command(cmd)
        if parsed is None:
            continue
        kind, target, args = parsed
        where = f"{doc.name}:{line}: {cmd}"
        if kind == "module":
            try:
                found = importlib.util.find_spec(target) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                problems.append(f"{where}: no module {target}")
                continue
            if target not in FLAG_MODULES:
                continue
            sub = args[0] if args and args[0] in FLAG_MODULES[target] else None
            key = f"module {target}" + (f" {sub}" if sub else "")
        else:
            if target.startswith(("$", "/")) or "/" not in target:
                continue  # a path on another machine or relative to another directory
            if not (ROOT / target).exists():
                problems.append(f"{where}: no script {target}")
                continue
            key = f"script {target}"
            if key not in accepted_flags:
                continue  # tests/*.py and other scripts: existence only
        bad = [f for f in _flags(args) if f not in accepted_flags[key]]
        if bad:
            problems.append(f"{where}: {key.split(' ', 1)[1]} does not accept {', '.join(bad)}")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Python blocks of README.md and docs/DEEPSPEED.md run
#
# A setup only makes inputs: tensors, a tiny model (in memory or saved to a directory), a DeepSpeed config dict,
# a dataset; plus what the launcher (torchrun / deepspeed) would have put in the environment. Every setup
# function takes (rank, world, tmp directory) and returns the names it defines.

S_PER_RANK = 16  # tokens per rank: every layout (zigzag: S divisible by 2P) and the tiny models take it


def _launcher_env(rank: int, world: int) -> None:
    """The variables torchrun / the DeepSpeed launcher set (the process group itself already exists)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))


def _setup_tensors(rank: int, world: int, tmp: str) -> dict:
    """``q``, ``k``, ``v``: the full sequence ``[B, S, H, D]`` (the same on every rank), float64."""
    import torch

    g = torch.Generator().manual_seed(0)
    b, s, h, d = 2, S_PER_RANK * world, 4, 8
    q, k, v = (torch.randn(b, s, h, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    return {"q": q, "k": k, "v": v}


def _setup_layer(rank: int, world: int, tmp: str) -> dict:
    """What the Ulysses drop-in gets: ``topo`` (the SP groups over the world), a ``local_attn`` module that says
    it is causal, this rank's contiguous shards ``q``, ``k``, ``v`` ``[b, s/p, h, d]``, ``batch_dim_idx = 0``."""
    import torch

    import ds_burst

    class LocalAttention(torch.nn.Module):
        """A user's local attention (ds-burst reads its options, never calls it)."""

        causal = True

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    full = _setup_tensors(rank, world, tmp)
    shard = lambda t: t.detach().chunk(world, dim=1)[rank].clone().requires_grad_()  # noqa: E731
    return {"topo": ds_burst.init_sequence_parallel(world), "local_attn": LocalAttention(),
            **{n: shard(t) for n, t in full.items()}, "batch_dim_idx": 0}


def _setup_ds_config(rank: int, world: int, tmp: str) -> dict:
    """``ds_config``: ZeRO-3, fp32, torch's AdamW (CPU), micro batch 1, plus the launcher's environment."""
    _launcher_env(rank, world)
    return {"ds_config": {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                          "zero_optimization": {"stage": 3},
                          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
                          "steps_per_print": 10**9}}


def _tiny_llama_config() -> object:
    """A 2-layer Llama config with GQA (4 query, 2 key/value heads of 8)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                       tie_word_embeddings=False)


def _setup_model(rank: int, world: int, tmp: str) -> dict:
    """``model``: a small plain PyTorch model."""
    import torch

    torch.manual_seed(0)
    return {"model": torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))}


def _setup_hf_llama(rank: int, world: int, tmp: str) -> dict:
    """``name``: a directory holding a tiny random Llama (``save_pretrained``; what a hub name would download),
    ``ids``: one sequence of token ids ``[1, S]``."""
    import torch
    from transformers import AutoModelForCausalLM

    name = os.path.join(tmp, "tiny-llama")
    if rank == 0:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(_tiny_llama_config()).save_pretrained(name)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    g = torch.Generator().manual_seed(1)
    return {"name": name, "ids": torch.randint(0, 64, (1, S_PER_RANK * world), generator=g)}


def _setup_trainer(rank: int, world: int, tmp: str) -> dict:
    """``model`` (a tiny Llama), ``ds`` (a few samples of ``S`` tokens with ``position_ids``), ``collate``, an
    ``output_dir``, ``ds_config`` as the HF Trainer takes it (``"auto"`` sizes)."""
    import torch
    from transformers import AutoModelForCausalLM

    _launcher_env(rank, world)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_llama_config(), attn_implementation="sdpa")
    g = torch.Generator().manual_seed(1)
    s = S_PER_RANK * world
    ds = [{"input_ids": ids, "labels": ids, "position_ids": list(range(s))}
          for ids in torch.randint(0, 64, (4, s), generator=g).tolist()]

    def collate(rows: list[dict]) -> dict:
        return {key: torch.tensor([r[key] for r in rows]) for key in rows[0]}

    return {"model": model, "ds": ds, "collate": collate, "output_dir": os.path.join(tmp, f"trainer{rank}"),
            "ds_config": {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                          "zero_optimization": {"stage": 3}}}


SETUPS: dict[str, Callable[[int, int, str], dict]] = {
    "tensors": _setup_tensors,
    "layer": _setup_layer,
    "ds_config": _setup_ds_config,
    "model": _setup_model,
    "hf_llama": _setup_hf_llama,
    "trainer": _setup_trainer,
}


@dataclass
class Snippet:
    """A python block and how it runs: ``world`` ranks, the named setups, integer variables, or a skip reason."""

    doc: str
    line: int
    code: str
    world: int
    setups: tuple[str, ...]
    variables: dict[str, int]
    skip: str | None

    @property
    def id(self) -> str:
        """``file:line`` of the block's first line."""
        return f"{self.doc}:{self.line}"


def parse_snippet(doc: Doc, block: Block) -> Snippet | str:
    """The block's run instructions, or why they are missing or wrong."""
    where = f"{doc.name}:{block.line}"
    if block.comment is None:
        return f"{where}: python block without a <!-- snippet: ... --> comment before it"
    skip = re.fullmatch(r"skip\s*\((.+)\)", block.comment)
    if skip:
        return Snippet(doc.name, block.line, block.text, 1, (), {}, skip.group(1).strip())
    world, setups, variables = 1, (), {}
    for word in block.comment.split():
        key, sep, value = word.partition("=")
        if not sep:
            return f"{where}: snippet comment word {word!r} is not key=value"
        if key == "setup":
            setups = tuple(value.split(","))
            unknown = [s for s in setups if s not in SETUPS]
            if unknown:
                return f"{where}: unknown setup {unknown} (known: {sorted(SETUPS)})"
        elif value.isdigit():
            if key == "world":
                world = int(value)
            else:
                variables[key] = int(value)
        else:
            return f"{where}: snippet comment word {word!r}: expected world=N, setup=A,B or NAME=INT"
    return Snippet(doc.name, block.line, block.text, world, setups, variables, None)


def _snippets() -> list[Snippet | str]:
    """Every python block of README.md and docs/DEEPSPEED.md, parsed (or why it cannot be)."""
    return [parse_snippet(read_doc(p), b) for p in SNIPPET_DOCS for b in read_doc(p).blocks if b.lang == "python"]


SNIPPET_TIMEOUT = 120.0  # seconds per snippet of a group


def _run_snippets(rank: int, world: int, snippets: list[Snippet], tmp: str) -> list[tuple[str, str]]:
    """One rank of a group of snippets, in order: for each, the setups' inputs, then the block's code as written,
    in a namespace of its own. Stops at the first that raises (the peers then fail fast on the closed
    connections). ``tmp`` is shared by the ranks (a model saved by rank 0 is read by all)."""
    import traceback

    done: list[tuple[str, str]] = []
    for i, snippet in enumerate(snippets):
        Path(tmp, f"progress{rank}").write_text(str(i))
        namespace: dict = {"__name__": "__snippet__", **snippet.variables}
        try:
            for name in snippet.setups:
                namespace.update(SETUPS[name](rank, world, os.path.join(tmp, str(i))))
            with contextlib.redirect_stdout(sys.stderr):
                exec(compile(snippet.code, f"{snippet.id} (python block)", "exec"), namespace)
        except BaseException:  # noqa: BLE001 - the snippet's failure is the result
            done.append(("error", traceback.format_exc()))
            break
        done.append(("ok", ""))
    return done


def _progress(run_dir: Path, rank: int) -> int:
    """Index of the snippet a rank of a group started last (0 before the first)."""
    path = run_dir / f"progress{rank}"
    return int(path.read_text()) if path.exists() else 0


def run_snippet_groups(snippets: list[Snippet], tmp: Path) -> dict[str, str | None]:
    """Run snippets of the same world size on one set of spawned ranks (imports and start-up paid once).

    Returns ``id -> None`` (ran on every rank) or the failure. When a snippet fails or hangs, the ones after it
    run again on fresh ranks, so every snippet's result is its own."""
    results: dict[str, str | None] = {}
    for world in sorted({s.world for s in snippets}):
        todo = [s for s in snippets if s.world == world]
        while todo:
            run_dir = tmp / f"world{world}_{len(results)}"
            run_dir.mkdir()
            limit = SNIPPET_TIMEOUT * len(todo)
            try:
                ranks = run_ranks(_run_snippets, world, todo, str(run_dir), timeout=limit)
            except TimeoutError:
                at = min(_progress(run_dir, r) for r in range(world))
                results.update({s.id: None for s in todo[:at]})
                results[todo[at].id] = f"no result within {limit:.0f} s (a hang?)"
                todo = todo[at + 1 :]
                continue
            per_rank = []
            for r, (status, value) in enumerate(ranks):
                if status != "ok":  # the process died outside a snippet's try (a crash): its progress says where
                    value = [("ok", "")] * _progress(run_dir, r) + [("error", f"the rank died: {value[0]}: {value[1]}")]
                per_rank.append(value)
            done = min(next((i for i, (st, _) in enumerate(v) if st != "ok"), len(v)) for v in per_rank)
            results.update({s.id: None for s in todo[:done]})
            if done == len(todo):
                break
            errors = [f"rank {r}: {v[done][1]}" for r, v in enumerate(per_rank) if len(v) > done and v[done][0] != "ok"]
            results[todo[done].id] = "\n".join(errors) or "a rank stopped before it"
            todo = todo[done + 1 :]
    return results


@pytest.fixture(scope="module")
def snippet_results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The results of the snippets selected in this session, run together per world size."""
    chosen = [item.callspec.params["snippet"] for item in request.session.items
              if item.name.startswith("test_python_block_runs[") and hasattr(item, "callspec")]
    return run_snippet_groups([s for s in chosen if not s.skip], tmp_path_factory.mktemp("snippets"))


@pytest.mark.parametrize("snippet", [s for s in _snippets() if isinstance(s, Snippet)], ids=lambda s: s.id)
def test_python_block_runs(snippet: Snippet, snippet_results: dict):
    if snippet.skip:
        pytest.skip(snippet.skip)
    failure = snippet_results[snippet.id]
    if failure is not None:
        pytest.fail(f"the python block at {snippet.id} does not run (world={snippet.world}, "
                    f"setups {list(snippet.setups)}):\n{failure}", pytrace=False)


# ---------------------------------------------------------------------------------------------------------------
# The tests

CHECKS: dict[str, Callable[[Doc], list[str]]] = {
    "paths": path_problems,
    "links": link_problems,
    "test_names": named_test_problems,
    "python_names": name_problems,
}


@pytest.mark.parametrize("check", CHECKS)
def test_docs_name_only_what_exists(check: str):
    _report([p for doc in _all_docs() for p in CHECKS[check](doc)])


def test_commands_name_modules_scripts_and_flags_that_exist(accepted_flags: dict[str, set[str]]):
    _report([p for doc in _all_docs() for p in command_problems(doc, accepted_flags)])


def test_every_python_block_says_how_it_runs():
    _report([s for s in _snippets() if isinstance(s, str)])


STALE_DOC = """# A stale page

See ds_burst/no_such_module.py, `kernels/no_such_tiles.py`, `tests/test_plan.py::test_no_such_case`,
[a link](NO_SUCH_FILE.md), [an anchor](API.md#no-such-heading), `test_no_such_function_anywhere`,
`ds_burst.training.losses.no_such_name`, `attention.no_such_module.fn` and:

    from ds_burst.core.cost_model import NoSuchThing
    python -m ds_burst.no_such_module
    python launch/no_such_script.py --out x
    deepspeed --num_gpus 2 launch/train.py --config configs/cpu_tiny.json --no-such-flag 1
    python -m ds_burst.plan project --no-such-plan-flag 2

```python
x = 1
```

<!-- snippet: world=2 setup=no_such_setup -->
```python
x = 2
```
"""


def test_each_check_finds_stale_references(accepted_flags: dict[str, set[str]]):
    doc = parse_doc(ROOT / "docs" / "STALE_EXAMPLE.md", STALE_DOC)
    found = {name: check(doc) for name, check in CHECKS.items()} | {"commands": command_problems(doc, accepted_flags)}
    expected = {
        "paths": ["ds_burst/no_such_module.py", "kernels/no_such_tiles.py", "defines no test_no_such_case"],
        "links": ["NO_SUCH_FILE.md): no such file", "no heading #no-such-heading"],
        "test_names": ["test_no_such_function_anywhere"],
        "python_names": ["losses has no no_such_name", "ds_burst.attention.no_such_module.fn",
                         "cost_model has no NoSuchThing"],
        "commands": ["no module ds_burst.no_such_module", "no script launch/no_such_script.py",
                     "launch/train.py does not accept --no-such-flag", "ds_burst.plan project does not accept "
                     "--no-such-plan-flag"],
    }
    for name, needles in expected.items():
        for needle in needles:
            assert any(needle in p for p in found[name]), f"{name} check missed {needle!r}: {found[name]}"
    snippets = [parse_snippet(doc, b) for b in doc.blocks if b.lang == "python"]
    assert "without a <!-- snippet: ... --> comment" in snippets[0] and "unknown setup" in snippets[1]


def test_a_python_block_that_fails_is_reported_alone(tmp_path: Path):
    bad = Snippet("STALE_EXAMPLE.md", 1, "raise ValueError('a stale example')", 1, (), {}, None)
    good = Snippet("STALE_EXAMPLE.md", 5, "assert P == 3", 1, (), {"P": 3}, None)
    results = run_snippet_groups([bad, good], tmp_path)
    assert "ValueError: a stale example" in results[bad.id] and results[good.id] is None
