"""Build the labelled corpus of the redaction evaluation (issue 14), from public sources.

    python benchmarks/redact_corpus.py --gitleaks PATH --trufflehog PATH --out corpus.jsonl

PATH is a git checkout (or bare repository) of https://github.com/gitleaks/gitleaks or
https://github.com/trufflesecurity/trufflehog; files are read at ``HEAD`` with ``git show``.
Nothing is downloaded here and no data is committed: the corpus is rebuilt from those trees
and a fixed seed. Each line of the output is one case::

    {"id": "gitleaks-gen/shopify-access-token/go - short", "label": "secret" | "benign",
     "text": "...", "secret": "..." | null, "source": "..."}

Sources, in order:

- ``gitleaks-gen``: for every rule of gitleaks' default configuration (``config/gitleaks.toml``),
  a secret generated from the rule's own regex (its secret group, seeded) and written in each of
  the syntaxes of gitleaks' ``GenerateSampleSecrets`` (INI, JSON, XML, YAML, C#, Go, Java,
  Kotlin, PHP, Python, ``System.setProperty``, logstash, make), which is how gitleaks' own
  rule tests are built. A case is kept only if the rule's regex (run with Python's ``re``)
  finds that very secret in it: the label is gitleaks' own verdict.
- ``gitleaks-tp`` / ``gitleaks-fp``: the literal true and false positives listed in gitleaks'
  rule generators (``cmd/generate/config/rules/*.go``: ``tps``/``fps`` string literals; an
  entry built by a function call is skipped).
- ``trufflehog``: the pattern tests of trufflehog's detectors (``pkg/detectors/**/*_test.go``,
  not the integration tests): a case whose ``want`` is non-empty is a secret, one whose
  ``want`` is empty a benign near-miss. Inputs given as string literals, variables holding
  literals, ``fmt.Sprintf`` of those, and ``+`` of those are read; anything else is skipped.
- ``near-miss``: benign text written here that looks like a secret to a careless scanner:
  placeholders (``ghp_xxxx...``, ``glpat-XXXX...``), documented example keys
  (``AKIAIOSFODNN7EXAMPLE``), UUIDs, hashes, ids, code naming keys without values.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import re
import string
import subprocess
import sys
import tomllib
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from re import _constants as C  # type: ignore[attr-defined]
from re import _parser  # type: ignore[attr-defined]
from typing import Any

SEED = 14

#: gitleaks cmd/generate/config/utils/generate.go, GenerateSampleSecrets (its TODOs left out).
TEMPLATES = {
    "ini - quoted1": '{i}Token="{s}"',
    "ini - quoted2": '{i}Token = "{s}"',
    "ini - unquoted1": "{i}Token={s}",
    "ini - unquoted2": "{i}Token = {s}",
    "json - string": '{\n    "{i}_token": "{s}"\n}',
    "json - escaped newline in string": '{"config.ini": "{I}_TOKEN={s}\\nBACKUP_ENABLED=true"}',
    "xml - element multiline": "<{i}Token>\n    {s}\n</{i}Token>",
    "yaml - singleline - unquoted": "{i}_token: {s}",
    "yaml - singleline - single quote": "{i}_token: '{s}'",
    "yaml - singleline - double quote": '{i}_token: "{s}"',
    "C#": 'string {i}Token = "{s}";',
    "go - normal": 'var {i}Token string = "{s}"',
    "go - short": '{i}Token := "{s}"',
    "go - backticks": "{i}Token := `{s}`",
    "java": 'String {i}Token = "{s}";',
    "kotlin - notype": 'var {i}Token = "{s}"',
    "php - string concat": '${i}Token .= "{s}"',
    "python - single quote": "{i}Token = '{s}'",
    "python - double quote": '{i}Token = "{s}"',
    "misc - comma operator": 'System.setProperty("{I}_TOKEN", "{s}")',
    "logstash": '  "{i}Token" => "{s}"',
    "make - recursive assignment": '{I}_TOKEN = "{s}"',
    "make - simple assignment": '{I}_TOKEN := "{s}"',
    "make - shell assignment": '{I}_TOKEN ::= "{s}"',
    "make - evaluated shell assignment": '{I}_TOKEN :::= "{s}"',
    "make - conditional assignment": '{I}_TOKEN ?= "{s}"',
}


def _git_show(repo: Path, path: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{path}"], check=True,
                          capture_output=True, text=True).stdout


def _git_ls(repo: Path, prefix: str) -> list[str]:
    out = subprocess.run(["git", "-C", str(repo), "ls-tree", "-r", "--name-only", "HEAD",
                          prefix], check=True, capture_output=True, text=True).stdout
    return out.split()


# -- strings from a regex -------------------------------------------------------------------

_ALNUM = string.ascii_letters + string.digits
_PRINTABLE = _ALNUM + "-_.+/="
_CATEGORY = {
    C.CATEGORY_DIGIT: string.digits, C.CATEGORY_WORD: _ALNUM + "_",
    C.CATEGORY_SPACE: " ", C.CATEGORY_NOT_DIGIT: string.ascii_letters,
    C.CATEGORY_NOT_WORD: "-.", C.CATEGORY_NOT_SPACE: _ALNUM,
}


class _Gen:
    """A random string matching a parsed pattern, with the text of each capture group."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.groups: dict[int, str] = {}

    def items(self, items: Any) -> str:
        return "".join(self.one(op, av) for op, av in items)

    def charset(self, av: Any) -> str:
        chars: set[str] = set()
        negate = False
        for op, arg in av:
            if op is C.NEGATE:
                negate = True
            elif op is C.LITERAL:
                chars.add(chr(arg))
            elif op is C.RANGE:
                lo, hi = arg
                chars.update(chr(c) for c in range(lo, min(hi, lo + 200) + 1))
            elif op is C.CATEGORY:
                chars.update(_CATEGORY.get(arg, ""))
        if negate:
            chars = set(_PRINTABLE) - chars
        return "".join(sorted(chars)) or "x"

    def one(self, op: Any, av: Any) -> str:
        rng = self.rng
        if op is C.LITERAL:
            return chr(av)
        if op is C.NOT_LITERAL:
            return rng.choice([c for c in _ALNUM if ord(c) != av])
        if op is C.ANY:
            return rng.choice(_ALNUM)
        if op is C.IN:
            return rng.choice(self.charset(av))
        if op is C.CATEGORY:
            return rng.choice(_CATEGORY.get(av, "x"))
        if op in (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT):
            lo, hi, sub = av
            hi = lo + 12 if hi is C.MAXREPEAT else hi
            return "".join(self.items(sub) for _ in range(rng.randint(lo, max(lo, hi))))
        if op is C.BRANCH:
            return self.items(rng.choice(av[1]))
        if op is C.SUBPATTERN:
            group, sub = av[0], av[-1]
            text = self.items(sub)
            if group is not None:
                self.groups[group] = text
            return text
        return ""  # assertions (\b, ^, $), lookarounds: nothing


def _py_regex(go: str) -> str:
    return go.replace(r"\z", r"\Z")


def sample(pattern: str, rng: random.Random, group: int | None) -> str | None:
    """A random secret for a gitleaks rule: the text of its secret group (or whole match)."""
    try:
        parsed = _parser.parse(_py_regex(pattern))
    except Exception:
        return None
    gen = _Gen(rng)
    whole = gen.items(parsed)
    if group is None:
        group = 1 if gen.groups else 0
    return whole if group == 0 else gen.groups.get(group)


# -- Go source literals ---------------------------------------------------------------------

def _go_string(token: str) -> str | None:
    if token.startswith("`"):
        return token[1:-1]
    try:
        value = ast.literal_eval(token)
    except (ValueError, SyntaxError):
        return None
    return value if isinstance(value, str) else None


_GO_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|`[^`]*`|//[^\n]*|/\*.*?\*/|\[\]string|[(){}\[\],+]'
                       r'|[^\s"`(){}\[\],+/]+|/',
                       re.S)


def _tokens(src: str) -> list[str]:
    return [t for t in _GO_TOKEN.findall(src) if not t.startswith(("//", "/*"))]


def _entries(tokens: list[str], i: int) -> tuple[list[list[str]], int]:
    """The comma-separated entries of the bracketed list opening at tokens[i]."""
    depth, entries, cur = 0, [], []
    j = i
    while j < len(tokens):
        t = tokens[j]
        if t in "({[":
            depth += 1
            if depth == 1:
                j += 1
                continue
        elif t in ")}]":
            depth -= 1
            if depth == 0:
                if cur:
                    entries.append(cur)
                return entries, j
        if depth == 1 and t == ",":
            entries.append(cur)
            cur = []
        else:
            cur.append(t)
        j += 1
    return entries, j


def _eval(expr: list[str], env: dict[str, str]) -> str | None:
    """A Go expression of string literals, names of literals, ``+`` and fmt.Sprintf."""
    if expr[:2] == ["fmt.Sprintf", "("] and expr[-1] == ")":
        args, _ = _entries(expr, 1)
        if not args:
            return None
        values = [_eval(a, env) for a in args]
        if any(v is None for v in values) or "%" in "".join(values[1:]):  # type: ignore[arg-type]
            return None
        fmt = values[0]
        assert fmt is not None
        try:
            return re.sub(r"%[sqv]", "{}", fmt.replace("{", "{{").replace("}", "}}")).format(
                *[repr(v) if False else v for v in values[1:]])
        except (IndexError, ValueError):
            return None
    out = []
    for k, t in enumerate(expr):
        if k % 2 == 1:
            if t != "+":
                return None
            continue
        if t[:1] in '"`':
            v = _go_string(t)
        else:
            v = env.get(t)
        if v is None:
            return None
        out.append(v)
    return "".join(out) if out else None


def _literal_env(tokens: list[str]) -> dict[str, str]:
    """Go names bound to string literal expressions (``x = "..."``, ``x := "..." + y``)."""
    env: dict[str, str] = {}
    for k, t in enumerate(tokens):
        if t in ("=", ":=") and k > 0 and k + 1 < len(tokens):
            name = tokens[k - 1]
            if not re.fullmatch(r"[A-Za-z_]\w*", name):
                continue
            expr = [tokens[k + 1]]
            m = k + 2
            while m + 1 < len(tokens) and tokens[m] == "+":
                expr += [tokens[m], tokens[m + 1]]
                m += 2
            value = _eval(expr, env)
            if value is not None:
                env[name] = value
    return env


# -- the sources ----------------------------------------------------------------------------

def gitleaks_generated(repo: Path, rng: random.Random) -> Iterator[dict[str, Any]]:
    config = tomllib.loads(_git_show(repo, "config/gitleaks.toml"))
    for rule in config["rules"]:
        pattern = rule.get("regex")
        if not pattern:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled = re.compile(_py_regex(pattern))
        except re.error:
            continue
        group = rule.get("secretGroup")
        ident = rule["id"].split("-")[0]
        for _ in range(20):  # a secret the rule itself finds in the first template
            secret = sample(pattern, rng, group)
            if secret and len(secret) >= 8 and "\n" not in secret:
                break
        else:
            continue
        for name, template in TEMPLATES.items():
            text = (template.replace("{i}", ident).replace("{I}", ident.upper())
                    .replace("{s}", secret))
            found = [m.group(group or (1 if compiled.groups else 0))
                     for m in compiled.finditer(text)]
            if secret not in found:
                continue  # gitleaks' own rule does not see it there: no label
            yield {"id": f"gitleaks-gen/{rule['id']}/{name}", "label": "secret", "text": text,
                   "secret": secret, "source": "gitleaks config/gitleaks.toml " + rule["id"]}


def gitleaks_literals(repo: Path) -> Iterator[dict[str, Any]]:
    for path in _git_ls(repo, "cmd/generate/config/rules/"):
        if not path.endswith(".go") or path.endswith("_test.go"):
            continue
        tokens = _tokens(_git_show(repo, path))
        for k in range(len(tokens) - 3):
            kind = tokens[k]
            if kind not in ("tps", "fps"):
                continue
            if tokens[k + 1] in (":=", "=") and tokens[k + 2] == "[]string" and \
                    tokens[k + 3] == "{":
                start = k + 3
            elif tokens[k + 1] == "=" and tokens[k + 2] == "append" and tokens[k + 3] == "(":
                start = k + 3
            else:
                continue
            entries, _ = _entries(tokens, start)
            for n, entry in enumerate(entries):
                if entry == [kind] or entry[:1] == ["..."] or not entry:
                    continue
                value = _eval(entry, {})
                if value is None or not value.strip():
                    continue
                label = "secret" if kind == "tps" else "benign"
                yield {"id": f"gitleaks-{kind[:2]}/{Path(path).stem}/{k}.{n}", "label": label,
                       "text": value, "secret": None, "source": f"gitleaks {path}"}


def trufflehog_cases(repo: Path) -> Iterator[dict[str, Any]]:
    for path in _git_ls(repo, "pkg/detectors/"):
        if not path.endswith("_test.go") or "integration" in path:
            continue
        src = _git_show(repo, path)
        if "input:" not in src:
            continue
        tokens = _tokens(src)
        env = _literal_env(tokens)
        for k, t in enumerate(tokens):
            if t != "input:":
                continue
            # the expression runs to the next top-level comma
            expr, depth, m = [], 0, k + 1
            while m < len(tokens):
                tok = tokens[m]
                if tok in "({[":
                    depth += 1
                elif tok in ")}]":
                    if depth == 0:
                        break
                    depth -= 1
                elif tok == "," and depth == 0:
                    break
                expr.append(tok)
                m += 1
            text = _eval(expr, env)
            if text is None or not text.strip():
                continue
            # want: []string{...} after the input (before the next input)
            label, wants = None, []
            for w in range(m, min(len(tokens), m + 400)):
                if tokens[w] == "input:":
                    break
                if tokens[w] == "want:":
                    if tokens[w + 1] == "nil":
                        label = "benign"
                    elif tokens[w + 1] == "[]string" and tokens[w + 2] == "{":
                        entries, _ = _entries(tokens, w + 2)
                        wants = [_eval(e, env) for e in entries]
                        label = "secret" if entries else "benign"
                    break
            if label is None:
                continue
            secret = next((s for s in wants if s and len(s) >= 8 and s in text), None)
            yield {"id": f"trufflehog/{Path(path).parent.name}/{k}", "label": label,
                   "text": text, "secret": secret, "source": f"trufflehog {path}"}


def near_misses(rng: random.Random) -> Iterator[dict[str, Any]]:
    """Benign text that looks like a secret: placeholders, documented examples, ids."""
    hexd = "0123456789abcdef"

    def r(alphabet: str, n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    fixed = [
        "AKIAIOSFODNN7EXAMPLE",
        "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "ghp_" + "x" * 36, "ghp_" + "X" * 36, "GITHUB_TOKEN=ghp_" + "x" * 36,
        "glpat-" + "X" * 20, "glpat-xxxxxxxxxxxxxxxxxxxx", "sk-" + "x" * 48,
        "OPENAI_API_KEY=sk-...", "OPENAI_API_KEY=sk-your-key-here", "api_key = 'YOUR_API_KEY'",
        "token: <your-token>", "password = '********'", "password: ${DB_PASSWORD}",
        "secret = os.environ['SECRET_KEY']", "api_key = os.getenv('API_KEY')",
        "token = self.tokenizer.pad_token", "secret_length = X25519.secret_length",
        "credentialsId: 'ff083f76-7804-4ef1-80e4-fe975bb9141b'",
        "key_id = 'c2a4b5e1-9f7d-4c1a-8e3b-0d6f2a9b7c41'",
        "TOKEN_URL = 'https://oauth2.googleapis.com/token'",
        "password_hash = bcrypt.hashpw(password, bcrypt.gensalt())",
        "auth = HTTPBasicAuth(user, password)", "session_token = None",
        "api_key: str | None = None", "def get_secret(name: str) -> str:",
        "tokenizer = AutoTokenizer.from_pretrained('bert-base-uncased')",
        "max_tokens=2048", "num_tokens = 51234", "secret_name = 'prod/db/password'",
        "SECRET_KEY = 'django-insecure-change-me'", "sk_test_xxxxxxxxxxxxxxxxxxxxxxxx",
        "xoxb-your-token", "Bearer <token>", "Authorization: Bearer $TOKEN",
        "curl -u $USER:$PASSWORD https://api.example.com",
        "postgres://user:password@localhost:5432/db", "mysql://root:@localhost/test",
        "https://user:<password>@host/path", "password=changeme", "password: example",
        "PRIVATE_KEY_PATH=/etc/ssl/private/key.pem", "key_file = '~/.ssh/id_rsa'",
        "-----BEGIN PUBLIC KEY-----", "ssh-rsa AAAAB3NzaC1yc2E user@host is a public key",
        "access_token_expires_in = 3600", "token_type = 'Bearer'",
        "refresh_token_ttl: 86400", "apikey_header = 'X-API-Key'",
        "secret_key_base_length = 128", "keyboard_layout = 'us'",
    ]
    for n, text in enumerate(fixed):
        yield {"id": f"near-miss/fixed/{n}", "label": "benign", "text": text, "secret": None,
               "source": "written for issue 14"}
    makers = [
        lambda: f"request_id = {uuid.UUID(int=rng.getrandbits(128))}",
        lambda: f"id: '{uuid.UUID(int=rng.getrandbits(128))}'",
        lambda: f"sha256: {r(hexd, 64)}",
        lambda: f"commit {r(hexd, 40)}",
        lambda: f"md5 = '{r(hexd, 32)}'",
        lambda: f"etag: \"{r(hexd, 32)}\"",
        lambda: f"checksum={r(hexd, 64)}",
        lambda: f"user_id={rng.randint(10**8, 10**12)}",
        lambda: f"trace_id {r(hexd, 32)} span_id {r(hexd, 16)}",
        lambda: f"  model.layers.{rng.randint(0, 40)}.attn.key_proj.weight  torch.Size([4096])",
        lambda: f"2024-0{rng.randint(1, 9)}-1{rng.randint(0, 9)} INFO token refreshed for user "
                f"{rng.randint(1000, 9999)}",
        lambda: f"docker pull ubuntu@sha256:{r(hexd, 64)}",
        lambda: f"integrity sha512-{r(_ALNUM + '+/', 86)}==",
        lambda: f"password_field_id = 'id_password_{rng.randint(1, 99)}'",
        lambda: f"secret_version = projects/{rng.randint(10**5, 10**6)}/secrets/db/versions/3",
        lambda: f"keyName: {r(string.ascii_lowercase, 8)}-{r(string.ascii_lowercase, 6)}",
    ]
    for n in range(40):
        for m, make in enumerate(makers):
            yield {"id": f"near-miss/gen/{m}/{n}", "label": "benign", "text": make(),
                   "secret": None, "source": "written for issue 14"}
    prefixes = ["ghp_", "gho_", "github_pat_", "glpat-", "xoxb-", "sk_live_", "AKIA", "hf_",
                "npm_", "AIza", "sk-proj-", "dckr_pat_", "shpat_", "SG."]
    for n, prefix in enumerate(prefixes):
        for fill in ("x", "X", "0", "*", "."):
            yield {"id": f"near-miss/placeholder/{n}/{fill}", "label": "benign",
                   "text": f"token = '{prefix}{fill * 36}'", "secret": None,
                   "source": "written for issue 14"}


def build(gitleaks: Path | None, trufflehog: Path | None) -> list[dict[str, Any]]:
    rng = random.Random(SEED)
    cases: list[dict[str, Any]] = []
    if gitleaks is not None:
        cases += gitleaks_generated(gitleaks, rng)
        cases += gitleaks_literals(gitleaks)
    if trufflehog is not None:
        cases += trufflehog_cases(trufflehog)
    cases += near_misses(rng)
    seen: set[tuple[str, str]] = set()
    out = []
    for case in cases:
        key = (case["label"], case["text"])
        if key not in seen:
            seen.add(key)
            out.append(case)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gitleaks", type=Path, help="a gitleaks checkout or bare repository")
    parser.add_argument("--trufflehog", type=Path, help="a trufflehog checkout or bare repo")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cases = build(args.gitleaks, args.trufflehog)
    with args.out.open("w") as f:
        for case in cases:
            f.write(json.dumps(case) + "\n")
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()[:12]
    counts: dict[str, int] = {}
    for case in cases:
        key = f"{case['source'].split()[0]}/{case['label']}"
        counts[key] = counts.get(key, 0) + 1
    print(f"{len(cases)} cases -> {args.out} (sha256 {digest}): {counts}", file=sys.stderr)


if __name__ == "__main__":
    main()
