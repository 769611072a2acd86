"""Prompt sources: the benchmark datasets under `../shared/data` (one loader per record format) and JSONL files.

Every source yields `PromptRecord`s: the user message text (dataset-specific instructions are added here, and only
here), an id, a category and, where the dataset has one, a reference answer.
"""

from __future__ import annotations

import gzip
import json
import re
import os
from dataclasses import dataclass, field
from pathlib import Path

from cllm.errors import CllmError


@dataclass
class PromptRecord:
    id: str
    prompt: str
    dataset: str
    category: str = ""
    answer: str | None = None  # reference answer when the source has one (GSM8K solution, Spider SQL, ...)
    meta: dict = field(default_factory=dict)
    index: int = -1  # stable position in the whole source (dataset order, or file line - 1), set by the loaders


def default_data_dir() -> Path:
    """`$CLLM_DATA_DIR`, else the nearest `shared/data` beside the working directory or this checkout, or above."""
    env = os.environ.get("CLLM_DATA_DIR")
    if env:
        return Path(env)
    for start in (Path.cwd().resolve(), Path(__file__).resolve().parents[1]):
        for parent in [start, *start.parents]:
            candidate = parent / "shared" / "data"
            if candidate.is_dir():
                return candidate
    return Path.cwd() / ".." / "shared" / "data"


GSM8K_INSTRUCTION = "Solve the problem step by step. End with a line of the form '#### <number>'."


def _gsm8k(root: Path, split: str) -> list[PromptRecord]:
    split = split or "test"
    out = []
    for i, rec in enumerate(read_jsonl(root / "gsm8k" / f"{split}.jsonl")):
        out.append(
            PromptRecord(
                id=f"gsm8k-{split}-{i}",
                prompt=f"{rec['question']}\n{GSM8K_INSTRUCTION}",
                dataset="gsm8k",
                category="math",
                answer=rec["answer"],
            )
        )
    return out


def _question_jsonl(name: str, folder: str):
    def load(root: Path, split: str) -> list[PromptRecord]:
        out = []
        for rec in read_jsonl(root / folder / "question.jsonl"):
            # Multi-turn questions: the first turn only (cllm decodes single-turn prompts).
            ref = rec.get("reference")
            out.append(
                PromptRecord(
                    id=str(rec["question_id"]),
                    prompt=rec["turns"][0],
                    dataset=name,
                    category=rec.get("category", ""),
                    answer=ref[0] if isinstance(ref, list) and ref and isinstance(ref[0], str) else None,
                    meta={"n_turns": len(rec["turns"])},
                )
            )
        return out

    return load


def _sharegpt(root: Path, split: str) -> list[PromptRecord]:
    path = root / "sharegpt" / "ShareGPT_V3_filtered_1000.json"
    out = []
    for rec in read_json(path):
        first = rec["conversations"][0]
        if first.get("from") != "human" or not first.get("value", "").strip():
            continue
        conv = rec["conversations"]
        # The first reply (when it follows) is the reference answer: draft distillation trains on it.
        reply = conv[1]["value"] if len(conv) > 1 and conv[1].get("from") == "gpt" else None
        out.append(PromptRecord(id=str(rec["id"]), prompt=first["value"], dataset="sharegpt", category="chat",
                                answer=reply))
    return out


def spider_schema(table: dict) -> str:
    """`table(col, col, ...)` lines for one database of Spider's tables.json."""
    cols: dict[int, list[str]] = {}
    for t_idx, col in table["column_names_original"]:
        if t_idx >= 0:
            cols.setdefault(t_idx, []).append(col)
    return "\n".join(f"{name}({', '.join(cols.get(i, []))})" for i, name in enumerate(table["table_names_original"]))


def _spider(root: Path, split: str) -> list[PromptRecord]:
    tables = {t["db_id"]: t for t in read_json(root / "spider" / "tables.json")}
    out = []
    for i, rec in enumerate(read_json(root / "spider" / "dev.json")):
        schema = spider_schema(tables[rec["db_id"]])
        prompt = (
            f"SQLite database '{rec['db_id']}' with tables:\n{schema}\n\n"
            f"Write one SQL query that answers: {rec['question']}\nAnswer with the SQL query only."
        )
        out.append(
            PromptRecord(id=f"spider-dev-{i}", prompt=prompt, dataset="spider", category=rec["db_id"],
                         answer=rec["query"], meta={"db_id": rec["db_id"]})
        )
    return out


def _humaneval(root: Path, split: str) -> list[PromptRecord]:
    path = root / "humaneval" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise CllmError(f"dataset file not found: {path}")
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            prompt = f"Complete the following Python function. Answer with code only.\n```python\n{rec['prompt']}```"
            out.append(
                PromptRecord(id=rec["task_id"], prompt=prompt, dataset="humaneval", category="code",
                             meta={"code_prompt": rec["prompt"], "test": rec["test"], "entry_point": rec["entry_point"]})
            )
    return out


def _code(root: Path, split: str) -> list[PromptRecord]:
    """CoSQA queries (functions from the CodeSearchNet Python corpus), the stand-in for CodeSearchNet-Python: the
    313 queries whose function answers them (with that function as the reference), or with split "all" every
    distinct query of the 604 (prompts for trajectory collection, where the model's own answers are the targets)."""
    if split not in ("", "all"):
        raise CllmError(f"dataset code has the splits '' (default: queries with a matching function) and 'all', "
                        f"got {split!r}")
    out, seen = [], set()
    for rec in read_json(root / "codesearchnet_cosqa" / "cosqa-dev.json"):
        if (split != "all" and rec.get("label") != 1) or rec["doc"] in seen:
            continue
        seen.add(rec["doc"])
        out.append(PromptRecord(id=rec["idx"], prompt=f"Write a Python function for: {rec['doc']}", dataset="code",
                                category="code", answer=rec["code"] if rec.get("label") == 1 else None))
    return out


# Pure-Python and C modules of the standard library whose functions make self-contained coding tasks.
STDLIB_MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "codecs", "collections", "colorsys", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.utils", "enum", "filecmp",
    "fnmatch", "fractions", "functools", "getopt", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html",
    "http.cookies", "inspect", "ipaddress", "itertools", "json", "keyword", "linecache", "locale", "logging", "math",
    "mimetypes", "operator", "os", "os.path", "pathlib", "pickle", "platform", "plistlib", "pprint", "quopri",
    "random", "re", "reprlib", "secrets", "shlex", "shutil", "statistics", "string", "struct", "tarfile", "tempfile",
    "textwrap", "tokenize", "traceback", "types", "typing", "unicodedata", "urllib.parse", "uuid", "warnings",
    "wave", "zipfile", "zlib",
)


def _first_sentence(doc: str) -> str | None:
    """The first sentence of a docstring that is not a signature line, if it reads as a task (15-160 chars)."""
    for para in doc.split("\n\n"):
        line = para.split("\n")[0].strip()
        if re.fullmatch(r"[\w.]+\(.*\)( -> .*)?|--", line):
            continue
        sentence = para.replace("\n", " ").split(". ")[0].strip()
        if sentence.endswith(("...", ",", ", .")) or not 15 <= len(sentence) <= 160 or not sentence[0].isupper():
            return None
        return sentence.rstrip(".")
    return None


def _defined_in(obj, mod_name: str) -> bool:
    """Whether obj comes from this module (or its C accelerator `_name`; `posix` for os), not an import of it."""
    base = mod_name.split(".")[0]
    return (getattr(obj, "__module__", None) or "").lstrip("_").split(".")[0] in ({base, "posix"} if base == "os"
                                                                                 else {base})


def _code_stdlib(root: Path, split: str) -> list[PromptRecord]:
    """Coding prompts made offline from this interpreter's standard library: for each public function or method
    (of a public class) of `STDLIB_MODULES` with a docstring, "Write a Python function `name`: <its first
    sentence>." Deterministic for one Python version; one prompt per distinct sentence. No references."""
    import importlib
    import inspect

    out, seen = [], set()
    for mod_name in STDLIB_MODULES:
        module = importlib.import_module(mod_name)
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not _defined_in(obj, mod_name):
                continue
            members = [(name, obj)]
            if inspect.isclass(obj):
                members = [(f"{name}.{m}", f) for m, f in sorted(vars(obj).items()) if not m.startswith("_")]
            for qual, fn in members:
                if not (inspect.isfunction(fn) or inspect.isbuiltin(fn) or inspect.ismethoddescriptor(fn)):
                    continue
                sentence = _first_sentence(inspect.getdoc(fn) or "")
                if sentence and sentence not in seen:
                    seen.add(sentence)
                    task = qual.split(".")[-1]
                    out.append(PromptRecord(id=f"stdlib-{mod_name}.{qual}", dataset="code_stdlib", category=mod_name,
                                            prompt=f"Write a Python function `{task}`: {sentence}."))
    return out


DATASETS = {
    "gsm8k": _gsm8k,
    "spec_bench": _question_jsonl("spec_bench", "spec_bench"),
    "mt_bench": _question_jsonl("mt_bench", "mt_bench"),
    "vicuna_bench": _question_jsonl("vicuna_bench", "vicuna_bench"),
    "sharegpt": _sharegpt,
    "spider": _spider,
    "humaneval": _humaneval,
    "code": _code,
    "code_stdlib": _code_stdlib,
}


def load_dataset_prompts(
    name: str, split: str | None = None, data_dir: str | Path | None = None, limit: int | None = None, offset: int = 0
) -> list[PromptRecord]:
    if name not in DATASETS:
        raise CllmError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    root = Path(data_dir) if data_dir else default_data_dir()
    if not root.is_dir():
        raise CllmError(f"data folder not found: {root} (pass --data-dir or set CLLM_DATA_DIR)")
    records = DATASETS[name](root, split or "")
    for i, r in enumerate(records):
        r.index = i
    return window(records, limit, offset)


def load_dataset_mix(names: str, split: str | None = None, data_dir: str | Path | None = None,
                     limit: int | None = None, offset: int = 0, spread: bool = False) -> list[PromptRecord]:
    """One or more comma-separated datasets, `limit`/`offset` applied to each. `spread` takes `limit` records evenly
    spaced over each dataset (after the offset) instead of the first ones, so that every category is represented."""
    out = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if not spread or limit is None:
            out += load_dataset_prompts(name, split, data_dir, limit, offset)
            continue
        records = load_dataset_prompts(name, split, data_dir, None, offset)
        if limit < 0:
            raise CllmError(f"limit must be >= 0, got {limit}")
        n = len(records)
        out += [records[i * n // limit] for i in range(min(limit, n))] if n else []
    if not out:
        raise CllmError(f"no prompts selected from dataset(s) {names!r}")
    return out


def read_prompt_file(path: str | Path, field_name: str = "prompt", on_bad: str = "fail", template: str | None = None):
    """All prompts of a JSONL file and the bad lines: `(records, bad)` with bad = ["file:line: reason", ...].

    Each line is an object with the prompt in `field_name` (optional `id`, `answer`, `category`). `template`, e.g.
    "Question: {question}\nAnswer:", builds the prompt from the line's fields instead. With on_bad="fail" the
    first bad line raises an error naming the file and line; with "skip" it is counted and left out.
    """
    path = Path(path)
    if not path.is_file():
        raise CllmError(f"prompt file not found: {path}")
    records, bad = [], []
    for lineno, line in jsonl_lines(path):
        try:
            if line is None:
                raise ValueError("not UTF-8 text")
            rec, text = _parse_prompt_line(line, field_name, template)
        except ValueError as e:
            msg = f"{path}:{lineno}: {e}"
            if on_bad == "fail":
                raise CllmError(msg) from None
            bad.append(msg)
            continue
        records.append(
            PromptRecord(id=str(rec.get("id", rec.get("question_id", lineno))), prompt=text, dataset=path.stem,
                         category=str(rec.get("category", "")), answer=rec.get("answer"), index=lineno - 1)
        )
    if not records:
        raise CllmError(f"prompt file has no prompts: {path}")
    return records, bad


def _parse_prompt_line(line: str, field_name: str, template: str | None):
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    if template is not None:
        try:
            text = template.format(**rec)
        except (KeyError, IndexError) as e:
            raise ValueError(f"template needs field {e}") from None
    elif field_name not in rec:
        raise ValueError(f"no field '{field_name}'")
    else:
        text = rec[field_name]
    if not isinstance(text, str):
        raise ValueError(f"field '{field_name}' is {type(text).__name__} {text!r:.40}, not text")
    if not text.strip():
        raise ValueError(f"field '{field_name}' is empty")
    return rec, text


def load_prompt_file(path: str | Path, field_name: str = "prompt", limit: int | None = None, offset: int = 0):
    """Prompts from a JSONL file (see `read_prompt_file`); any bad line is an error naming file and line."""
    records, _ = read_prompt_file(path, field_name)
    return window(records, limit, offset)


def window(records: list[PromptRecord], limit: int | None, offset: int) -> list[PromptRecord]:
    if offset < 0:
        raise CllmError(f"offset must be >= 0, got {offset}")
    if limit is not None and limit < 1:
        raise CllmError(f"limit must be >= 1, got {limit}")
    if records and offset >= len(records):
        raise CllmError(f"offset {offset} is past the end: there are {len(records)} prompts")
    out = records[offset : None if limit is None else offset + limit]
    if limit is not None and len(out) < limit:
        import sys

        print(f"[cllm] limit {limit}: only {len(out)} prompts from offset {offset} ({len(records)} in all); "
              f"using {len(out)}", file=sys.stderr)
    return out


def jsonl_lines(path: Path):
    """(line number, text) of each non-blank line of a file; the text is None where the line is not UTF-8, so the
    reader can name the file and line (or skip it) instead of failing somewhere inside the codec."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError:
                yield lineno, None


def read_jsonl(path: Path, what: str = "dataset file") -> list[dict]:
    """Every line of a JSONL file as an object; a bad line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise CllmError(f"{what} not found: {path}")
    out = []
    for lineno, line in jsonl_lines(path):
        if line is None:
            raise CllmError(f"{path}:{lineno}: not UTF-8 text")
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise CllmError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return out



def read_json(path: Path, what: str = "dataset file", hint: str = ""):
    """A JSON file's content; missing, not UTF-8 or not JSON is an error naming the file (and `hint`)."""
    path = Path(path)
    if not path.is_file():
        raise CllmError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CllmError(f"{path}: corrupt {what}, not valid JSON ({e}){hint}") from None


def load_records(source) -> list[PromptRecord]:
    """The prompts of a command, from exactly one source: texts given on the command line (`source.prompt`, a list,
    where the command has it), a JSONL file (`prompts`, `prompt_field`), or dataset name(s) (`dataset`, `split`,
    `data_dir`, `spread`; comma-separated, --limit and --offset then apply to each). `source` is the command's
    config or parsed flags."""
    texts, prompts, limit, offset = getattr(source, "prompt", None), source.prompts, source.limit, source.offset
    if texts is not None:
        for i, text in enumerate(texts):
            if not text.strip():
                raise CllmError(f"--prompt number {i + 1} is empty")
        return [PromptRecord(id=str(i), prompt=text, dataset="cli") for i, text in enumerate(texts)]
    if prompts is not None:
        return load_prompt_file(prompts, source.prompt_field, limit, offset)
    return load_dataset_mix(source.dataset, source.split, source.data_dir, limit, offset, source.spread)
