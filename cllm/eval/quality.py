"""Answer quality as pure functions: GSM8K answers, Spider SQL component matching, HumanEval execution, repetition.

- GSM8K: the final number of an answer is the one after '####', else the last number in the text.
- Spider: exact-set-match without values, the official metric's idea in a compact form: both queries are split into
  components (SELECT items, FROM tables and join conditions, WHERE/HAVING conditions, GROUP BY, ORDER BY with
  direction, LIMIT presence, DISTINCT, nested INTERSECT/UNION/EXCEPT), table aliases are resolved and bare columns
  qualified with the schema of `tables.json`, literals become `value`, and every component is compared as a set.
  No databases exist here, so there is no execution accuracy.
- HumanEval: the candidate program (the prompt completed by the answer, or the answer's own function) runs in the
  sandbox (`cllm.eval.sandbox`); the dataset's tests run outside it and call the candidate's function through a
  pipe; pass@1 is the share whose `check` returns.
- Repetition: an answer is degenerate when a span of at least `min_span` tokens repeats with a period of at most
  `max_period` tokens ("the the the", a sentence looping). Such answers are counted, never dropped.
"""

from __future__ import annotations

import re

from cllm.data.trajectories import is_degenerate  # noqa: F401  (the loop detector lives with the data filters)

# ------------------------------------------------------------------------------------------------------- GSM8K

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _clean_number(s: str) -> str | None:
    s = s.replace(",", "").rstrip(".")
    try:
        x = float(s)
    except ValueError:
        return None
    return str(int(x)) if x == int(x) else repr(x)


def extract_number(text: str) -> str | None:
    """The final answer of a GSM8K-style solution: the number after the last '####', else the last number."""
    if "####" in text:
        after = text.rsplit("####", 1)[1]
        m = _NUMBER.search(after.replace("$", ""))
        if m:
            return _clean_number(m.group())
    found = _NUMBER.findall(text.replace("$", ""))
    return _clean_number(found[-1]) if found else None


def gsm8k_correct(prediction: str, reference: str) -> bool:
    gold = extract_number(reference)
    return gold is not None and extract_number(prediction) == gold


# ------------------------------------------------------------------------------------------------- repetition


def repeat_rate(answers: list[list[int]], **kwargs) -> float | None:
    return sum(is_degenerate(a, **kwargs) for a in answers) / len(answers) if answers else None


# -------------------------------------------------------------------------------------------------- HumanEval

def extract_code(text: str) -> str:
    """The first fenced code block of a chat answer (```python ... ```), else the whole text."""
    m = re.search(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", text, flags=re.S)
    return m.group(1) if m else text


def humaneval_program(code_prompt: str, entry_point: str, answer: str) -> str:
    """The candidate program: the answer's code if it defines the entry point (after the prompt, for its imports
    and helpers), else the prompt completed by the answer as the function body. The tests are not in it: they run
    in the supervisor (`cllm.eval.sandbox.run_tests`)."""
    code = extract_code(answer)
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, flags=re.M):
        return code_prompt + "\n    pass\n\n" + code
    return code_prompt + code


def humaneval_passes(meta: dict, answer: str, timeout: float = 10.0, level: str | None = None):
    """Score an answer to a HumanEval problem (`meta`: code_prompt, test, entry_point) in the sandbox; returns its
    `RunResult` (passed, status, level). The prompt's own code (helpers the tests call, such as `poly` or
    `encode_cyclic`) is defined on the trusted side from the dataset, not from the answer."""
    from cllm.eval.sandbox import run_tests

    program = humaneval_program(meta["code_prompt"], meta["entry_point"], answer)
    return run_tests(program, meta["test"], meta["entry_point"], helpers=meta["code_prompt"], timeout=timeout,
                     level=level)


# ----------------------------------------------------------------------------------------------------- Spider

_SQL_TOKEN = re.compile(r"""'(?:[^']|'')*'|"[^"]*"|-?\d+(?:\.\d+)?|[A-Za-z_][\w]*(?:\.[A-Za-z_*][\w]*)?|>=|<=|!=|<>|[(),*=<>+\-/%]""")
_CLAUSES = ("select", "from", "where", "group", "having", "order", "limit")
_SET_OPS = ("intersect", "union", "except")
_AGGS = {"count", "sum", "avg", "min", "max"}


def _tokens(sql: str) -> list[str]:
    out = []
    for tok in _SQL_TOKEN.findall(sql.strip().rstrip(";")):
        if tok[0] in "'\"" or re.fullmatch(r"-?\d+(?:\.\d+)?", tok):
            out.append("value")  # exact match without values
        else:
            out.append(tok.lower())
    return out


def _split_top(tokens: list[str], words: set[str]) -> list[tuple[str | None, list[str]]]:
    """Split at top-level (depth 0) occurrences of `words`; returns (word before the part, part)."""
    parts, cur, depth, lead = [], [], 0, None
    for t in tokens:
        depth += t == "("
        depth -= t == ")"
        if depth == 0 and t in words:
            parts.append((lead, cur))
            cur, lead = [], t
        else:
            cur.append(t)
    parts.append((lead, cur))
    return parts


def sql_components(sql: str | list[str], schema: dict | None = None):
    """A comparable structure of one query (see the module doc). `schema` is the tables.json entry of its db."""
    tokens = _tokens(sql) if isinstance(sql, str) else sql
    # Set operations at the top level bind the whole query: A INTERSECT B.
    parts = _split_top(tokens, set(_SET_OPS))
    if len(parts) > 1:
        return ("setop", parts[1][0], sql_components(parts[0][1], schema), sql_components(_rejoin(parts[1:]), schema))
    clauses: dict[str, list[str]] = {}
    for lead, part in _split_top(tokens, set(_CLAUSES)):
        if lead is not None:
            if lead in ("group", "order") and part[:1] == ["by"]:
                part = part[1:]
            clauses[lead] = part
    aliases, tables = _from_tables(clauses.get("from", []))
    columns = _schema_columns(schema, tables)

    def norm(part: list[str]) -> tuple:
        return _normalize(part, aliases, tables, columns, schema)

    def conditions(part: list[str]) -> tuple:
        pieces = _split_top(part, {"and", "or"})
        return (frozenset(norm(p) for _, p in pieces), frozenset(w for w, _ in pieces if w))

    select = clauses.get("select", [])
    distinct = select[:1] == ["distinct"]
    select_items = frozenset(norm(p) for _, p in _split_top(select[1:] if distinct else select, {","}))
    join_conds = set()
    for lead, part in _split_top(clauses.get("from", []), {"on"}):
        if lead != "on":
            continue
        condition = _split_top(part, {"join", ","})[0][1]  # up to the next joined table
        for _, equality in _split_top(condition, {"and"}):
            join_conds.add(frozenset(norm(side) for _, side in _split_top(equality, {"="})))
    join_conds = frozenset(join_conds)
    order = clauses.get("order", [])
    order_items = tuple(norm([t for t in p if t not in ("asc", "desc")]) + (("desc",) if "desc" in p else ("asc",),)
                        for _, p in _split_top(order, {","})) if order else ()
    return (
        "select",
        distinct,
        select_items,
        frozenset(tables),
        join_conds,
        conditions(clauses["where"]) if "where" in clauses else None,
        frozenset(norm(p) for _, p in _split_top(clauses["group"], {","})) if "group" in clauses else None,
        conditions(clauses["having"]) if "having" in clauses else None,
        order_items,
        "limit" in clauses,
    )


def _normalize(part: list[str], aliases, tables, columns, schema) -> tuple:
    """A clause's tokens with columns resolved to their tables and nested queries compared structurally."""
    out = []
    i = 0
    while i < len(part):
        if part[i] == "(" and i + 1 < len(part) and part[i + 1] == "select":
            depth, j = 0, i
            while j < len(part):
                depth += part[j] == "("
                depth -= part[j] == ")"
                if depth == 0:
                    break
                j += 1
            out.append(sql_components(part[i + 1 : j], schema))
            i = j + 1
            continue
        out.append(_column(part[i], aliases, tables, columns))
        i += 1
    return tuple(out)


def _rejoin(parts) -> list[str]:
    """Tokens of split parts joined back with the words between them (the first part's lead dropped)."""
    out = []
    for k, (lead, p) in enumerate(parts):
        if k:
            out.append(lead)
        out.extend(p)
    return out


def _from_tables(from_tokens: list[str]) -> tuple[dict[str, str], list[str]]:
    """Alias map and table names of a FROM clause (`t AS a`, `t a`, joins); ON conditions are skipped."""
    aliases, tables = {}, []
    for _, segment in _split_top(from_tokens, {"join", ","}):
        head = _split_top(segment, {"on"})[0][1]
        if not head or head[0] == "(":
            continue
        table = head[0]
        tables.append(table)
        rest = [t for t in head[1:] if t != "as"]
        if rest:
            aliases[rest[0]] = table
    return aliases, tables


def _schema_columns(schema: dict | None, tables: list[str]) -> dict[str, list[str]]:
    """Bare column name -> the FROM tables that have it."""
    if not schema:
        return {}
    names = [t.lower() for t in schema["table_names_original"]]
    out: dict[str, list[str]] = {}
    for t_idx, col in schema["column_names_original"]:
        if t_idx >= 0 and names[t_idx] in tables:
            out.setdefault(col.lower(), []).append(names[t_idx])
    return out


def _column(tok: str, aliases: dict, tables: list[str], columns: dict) -> str:
    if "." in tok:
        alias, col = tok.split(".", 1)
        return f"{aliases.get(alias, alias)}.{col}"
    if tok in columns and len(columns[tok]) == 1:
        return f"{columns[tok][0]}.{tok}"
    if tok not in _AGGS and len(tables) == 1 and re.fullmatch(r"[a-z_]\w*", tok) and tok not in _KEYWORDS:
        return f"{tables[0]}.{tok}"
    return tok


_KEYWORDS = {"select", "from", "where", "group", "by", "having", "order", "limit", "and", "or", "not", "in", "like",
             "between", "is", "null", "distinct", "as", "join", "on", "asc", "desc", "value", "exists"}


def spider_exact_match(prediction: str, gold: str, schema: dict | None = None) -> bool:
    """Exact-set-match (without values) of a predicted SQL query against the gold one."""
    pred = extract_sql(prediction)
    if not pred:
        return False
    try:
        return sql_components(pred, schema) == sql_components(gold, schema)
    except (IndexError, ValueError):  # a query too broken to split into clauses does not match
        return False


def extract_sql(text: str) -> str:
    """The SQL of a chat answer: a fenced block if any, else from the first SELECT to the end of that statement."""
    m = re.search(r"```(?:sql|sqlite)?\s*\n(.*?)(?:```|$)", text, flags=re.S | re.I)
    body = m.group(1) if m else text
    m = re.search(r"\bselect\b.*", body, flags=re.S | re.I)
    if not m:
        return ""
    return m.group(0).split(";")[0].strip()
