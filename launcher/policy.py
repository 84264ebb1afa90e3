"""The policy: typed, frozen, validated once.

One policy describes every profile for every audience. It is the built-in
``builtin.toml`` with an operator's TOML file merged over it key by key. The
operator file is found at ``$CELLBLOCK_POLICY`` (a path), else as
``cellblock.toml`` on the Jupyter config path (``jupyter --paths``). The one value the
built-in file cannot hold, the ``path`` of its ``[datasets.sample]`` (a CSV shipped in the
package, read by the embedded quickstart), is filled in here (:func:`sample_path`).

Every model is ``frozen`` and ``extra="forbid"``: a typo in a key is an error
that names the key and lists the allowed ones, never a silently ignored setting.
Defaults are the restrictive choice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .datasets import Dataset, check_profiles
from .egress.hosts import AllowRule, HostError, parse_rule
from .errors import PolicyError, ProfileDisabled, UnknownProfile
from .jailuids import JAIL_UIDS_ENV, parse_uid_range

__all__ = [
    "AuditSettings",
    "Budgets",
    "FilesPolicy",
    "HostSettings",
    "Limits",
    "NetworkPolicy",
    "OutputPolicy",
    "Policy",
    "Profile",
    "find_policy_file",
    "load_policy",
    "parse_size",
    "sample_path",
]

POLICY_ENV = "CELLBLOCK_POLICY"
SAMPLE_DATASET = "sample"  # builtin.toml's [datasets.sample]: its path is the shipped file
POLICY_FILENAME = "cellblock.toml"
CGROUP_PARENT_ENV = "CELLBLOCK_CGROUP_PARENT"

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1024, "kib": 1024,
    "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1024**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1024**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(value: object) -> int:
    """Turn ``"1GiB"``, ``"512M"``, ``"64kib"`` or an int of bytes into bytes.

    Units are binary (K = 1024). Raises ``ValueError`` naming the allowed forms.
    """
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512MiB or 1GiB, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise ValueError("expected a size such as 512MiB, 1GiB or a number of bytes")


def human_bytes(n: int) -> str:
    """``n`` bytes in words: ``1 GiB``, ``1.5 MiB``, ``512 B``."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]
_NAME = r"^[a-z][a-z0-9_-]{0,39}$"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Limits(_Model):
    """Resource limits of one kernel. Memory, pids and CPU are cgroup limits."""

    memory: Size = Field(1024**3, gt=0, description="cgroup memory limit (no swap)")
    pids: int = Field(128, ge=8, le=1_000_000, description="cgroup pids.max")
    cpus: float = Field(1.0, gt=0, le=1024, description="CPU quota in cores")
    tmp_size: Size = Field(256 * 1024**2, gt=0, description="tmpfs size of /tmp")
    home_size: Size = Field(64 * 1024**2, gt=0, description="tmpfs size of $HOME")
    open_files: int = Field(1024, ge=64, le=1_048_576, description="RLIMIT_NOFILE")
    file_size: Size = Field(256 * 1024**2, ge=1024**2, description="RLIMIT_FSIZE")
    warden_memory: Size = Field(1024**3, ge=256 * 1024**2,
                                description="memory of the kernel's warden (the host process "
                                "running its gate): its cgroup limit and its address space")
    warden_cpus: float = Field(1.0, gt=0, le=1024, description="CPU quota of the kernel's "
                               "warden, in cores")


PII_KINDS = ("email", "phone", "card", "iban", "ssn")


class OutputPolicy(_Model):
    """What may leave the gate: budgets, rich-output limits and redaction."""

    stream_head: Size = Field(16 * 1024, ge=0, description="stream bytes kept from a cell's "
                              "start (per cell, all streams together)")
    stream_tail: Size = Field(4 * 1024, ge=0, description="stream bytes kept from a cell's end")
    spool_bytes: Size = Field(64 * 1024**2, ge=0, description="stream text cut by the "
                              "budget is kept (redacted) on the host for read_output, up to "
                              "this many bytes per kernel; 0 keeps none")
    max_text: Size = Field(64 * 1024, ge=256, description="cap on any other text value "
                           "(a MIME value, an evalue, a traceback, a reply field), head+tail")
    max_image: Size = Field(1024 * 1024, ge=0, description="cap on one image (base64 bytes); "
                            "a larger one is replaced by a text saying so")
    # The image budget of a profile marked for LLMs (cellblock.output.imagefit); 0: none.
    image_max_side: int = Field(0, ge=0, le=1 << 24, description="long side in pixels every "
                                "image must fit (header-checked by the gate; matplotlib "
                                "figures rendered to fit in the jail); 0: no limit")
    image_max_pixels: int = Field(0, ge=0, le=1 << 40, description="width x height every "
                                  "image must fit; 0: no limit")
    image_max_bytes: Size = Field(0, ge=0, description="decoded bytes every image must fit; "
                                  "0: no limit. Any image budget refuses SVG and image types "
                                  "without a header reader (only PNG, JPEG, GIF, WebP pass)")
    allowed_mime: tuple[str, ...] | None = Field(
        None, description="MIME types forwarded in rich outputs (None: all); others dropped")
    neutralize_urls: bool = Field(False, description="replace remote URLs in markdown/HTML")
    normalise: bool = Field(False, description="always send the normalised text (no ANSI, "
                            "zero-width or homoglyph tricks), not only when a finding was made")
    redact_secrets: bool = True
    pii: tuple[Literal["email", "phone", "card", "iban", "ssn"], ...] = ()
    redact_values: tuple[str, ...] = Field((), description="exact secrets to redact")
    redact_env: tuple[str, ...] = Field((), description="names of environment variables of "
                                        "the launching process whose values are redacted")
    allow_comms: bool = Field(False, description="forward comm_open/comm_msg (widgets)")

    @model_validator(mode="after")
    def _budget_sees_markup_images(self) -> OutputPolicy:
        """An image hides in markdown, HTML and SVG as a ``data:`` URL, which the gate finds
        (and removes, on a profile with an image budget) only where it parses them."""
        budget = self.image_max_side or self.image_max_pixels or self.image_max_bytes
        if budget and not self.neutralize_urls:
            raise ValueError("an image budget (image_max_side, image_max_pixels, "
                             "image_max_bytes) needs neutralize_urls = true: images in "
                             "markdown, HTML and SVG are found by that parse; set both, or "
                             "set the three image_max_* to 0")
        return self


class FilesPolicy(_Model):
    """Files between the client and the jail (launcher/files/): an inbox the client fills
    and the jail reads at /inbox, an outbox the jail fills at /outbox and the client reads.
    Off unless a profile turns it on."""

    inbox: bool = Field(False, description="the client may upload files, read-only at /inbox")
    max_upload: Size = Field(16 * 1024**2, ge=1, description="one inbox file")
    max_inbox_files: int = Field(16, ge=1, le=10_000, description="files in the inbox")
    max_inbox_bytes: Size = Field(64 * 1024**2, ge=1, description="all inbox files together")
    outbox: bool = Field(False, description="a capped tmpfs at /outbox the client may read")
    outbox_size: Size = Field(16 * 1024**2, ge=1024**2, description="tmpfs size of /outbox")
    outbox_files: int = Field(64, ge=4, le=100_000, description="tmpfs nr_inodes of /outbox")
    max_download: Size = Field(8 * 1024**2, ge=1, description="one outbox file the client "
                               "may fetch (by its size, before reading)")
    text_suffixes: tuple[str, ...] = Field(
        (".csv", ".tsv", ".txt", ".json", ".md"), description="outbox files sent as UTF-8 "
        "text (redacted when redact_text)")
    image_suffixes: tuple[Literal[".png", ".jpg", ".jpeg", ".gif", ".webp"], ...] = Field(
        (".png",), description="outbox files sent as image bytes (checked by their magic "
        "number, never decoded)")
    redact_text: bool = Field(True, description="text files pass the profile's redaction "
                              "([profiles.NAME.output]) before they leave")

    @field_validator("text_suffixes")
    @classmethod
    def _suffixes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for suffix in value:
            if not re.fullmatch(r"\.[a-z0-9]{1,10}", suffix):
                raise ValueError(f"suffix {suffix!r}: a dot and 1-10 of a-z 0-9, like '.csv'")
        return value


class Budgets(_Model):
    """What one kernel may spend, enforced by the warden and the gate (docs/operations.md).

    0 turns a budget off. A cell's clock starts when the gate forwards its execute_request
    (or when the cell before it is answered, if it queued), never on the kernel's word.
    """

    cell_seconds: float = Field(30.0, ge=0, description="wall clock per cell; then an "
                                "interrupt_request")
    grace_seconds: float = Field(5.0, gt=0, description="after the interrupt, then the jail is "
                                 "killed and restarted in place")
    lifetime_seconds: float = Field(3600.0, ge=0, description="the kernel's whole life; then "
                                    "it is stopped")
    idle_seconds: float = Field(600.0, ge=0, description="no request and no running cell for "
                                "this long; then the kernel is stopped")
    executions: int = Field(1000, ge=0, description="execute_requests per kernel; later ones "
                            "are refused")
    output_bytes: Size = Field(10_000_000, ge=0, description="total output content bytes sent "
                               "to clients; then the kernel is stopped")


class NetworkPolicy(_Model):
    """Egress through the warden's proxy (docs/network.md). Empty ``allow``: no network."""

    allow: tuple[str, ...] = Field((), description="hosts the kernel may reach: 'pypi.org', "
                                   "'*.example.com', 'host:8443'; no port means 80 and 443")
    max_bytes: Size = Field(1024**3, ge=0, description="bytes both ways per kernel; then it "
                            "is stopped (0: no limit)")
    max_connections: int = Field(1000, ge=0, description="connections per kernel, refused "
                                 "ones included; then it is stopped (0: no limit)")
    max_concurrent: int = Field(16, ge=1, le=1024, description="connections open at once; "
                                "more are refused")
    lock_after_seconds: float = Field(0.0, ge=0, description="close the allowlist this long "
                                      "after the kernel starts (0: only on lock_network())")

    @field_validator("allow")
    @classmethod
    def _rules(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            try:
                parse_rule(entry)
            except HostError as exc:
                raise ValueError(f"{exc}; allowed: 'host', 'host:port', '*.domain', "
                                 "'*.domain:port', an IP address") from None
        return value

    def rules(self) -> tuple[AllowRule, ...]:
        return tuple(parse_rule(entry) for entry in self.allow)


class Profile(_Model):
    """One kind of sandbox: limits, environment, and what clients may ask."""

    display_name: str = ""
    description: str = ""
    python: str = Field(
        "auto",
        description="the kernel's Python: 'auto' (the interpreter cellblock runs on) or a path "
        "to an interpreter whose environment the jail's uid can read",
    )
    nsjail_config: str = Field(
        "python-kernel-no-net.cfg",
        description="a file name in cellblock's nsjail-configs/, or an absolute path",
    )
    seccomp_policy: str = Field(
        "seccomp-kernel.kafel",
        description="a kafel file name in nsjail-configs/, or an absolute path",
    )
    cgroups: Literal["required", "off"] = Field(
        "required",
        description="'off' runs without cgroup memory/pids/cpu limits; never a silent fallback",
    )
    allow_stdin: bool = False
    allowed_requests: tuple[str, ...] | None = Field(
        None, description="client request msg_types forwarded to the kernel (None: all known)"
    )
    startup_timeout: float = Field(60.0, gt=0, le=3600)
    warm_pool: int = Field(
        0, ge=0, le=64,
        description="kernels kept started and waiting, per client process (Jupyter Server, "
        "an LLM backend), so that a start adopts one instead of booting a jail; 0: none",
    )
    limits: Limits = Limits()
    budgets: Budgets = Budgets()
    network: NetworkPolicy = NetworkPolicy()
    enabled: bool = Field(True, description="false: no new kernel starts on this profile")
    audit_code_text: bool = Field(False, description="keep each cell's code text in the audit "
                                  "log (else only its sha256)")
    output: OutputPolicy = OutputPolicy()
    files: FilesPolicy = FilesPolicy()
    datasets: tuple[str, ...] = Field((), description="names in [datasets] this profile allows")
    default_datasets: tuple[str, ...] = Field(
        (), description="granted when a launch asks for none (a subset of datasets)"
    )


class HostSettings(_Model):
    """Settings of the host rather than of a profile."""

    nsjail: str = Field("", description="nsjail binary; empty: $CELLBLOCK_NSJAIL or bundled")
    # no component may start with ".": "." and ".." would leave the controller's tree
    cgroup_parent: str = Field(
        "cellblock", pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*$"
    )
    jail_uids: str = Field(
        "auto", description='host uids of jails (as root): "auto" or "FIRST-LAST" '
        "(cellblock.jailuids); $CELLBLOCK_JAIL_UIDS overrides it")

    @field_validator("jail_uids")
    @classmethod
    def _uid_range(cls, value: str) -> str:
        parse_uid_range(value)  # ValueError names the value and the allowed forms
        return value.strip()


class AuditSettings(_Model):
    """Where the audit log goes (docs/operations.md has the event schema)."""

    dir: str = Field("", description="audit directory; empty: $CELLBLOCK_AUDIT_DIR, else "
                     "/var/log/cellblock (root) or ~/.local/state/cellblock/audit")


class Policy(_Model):
    """The whole resolved policy."""

    host: HostSettings = HostSettings()
    audit: AuditSettings = AuditSettings()
    profiles: dict[Annotated[str, Field(pattern=_NAME)], Profile] = {}
    datasets: dict[Annotated[str, Field(pattern=_NAME)], Dataset] = {}
    sources: tuple[str, ...] = ()

    def profile(self, name: str) -> Profile:
        """Return profile ``name`` or raise :class:`UnknownProfile` listing the known ones."""
        try:
            return self.profiles[name]
        except KeyError:
            known = ", ".join(sorted(self.profiles)) or "(none)"
            raise UnknownProfile(f"unknown profile {name!r}; known profiles: {known}") from None

    def startable(self, name: str) -> Profile:
        """Profile ``name`` if a kernel may start on it now: the one answer the provisioner,
        the Sandbox and the warden give. Raises :class:`UnknownProfile` (naming the known
        ones) or :class:`ProfileDisabled`."""
        profile = self.profile(name)
        if not profile.enabled:
            raise ProfileDisabled(
                f"cellblock profile {name!r} is disabled by the operator (enabled = false in "
                f"[profiles.{name}] of {' + '.join(self.sources)}); no new kernel starts on it")
        return profile

    def digest(self) -> str:
        """sha256 of the resolved policy, for the audit log and `profiles show`."""
        blob = json.dumps(self.model_dump(mode="json", exclude={"sources"}), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: Any = Policy
    for part in loc[:-1]:
        if model is Policy and part in ("profiles", "datasets"):
            model = dict if part == "profiles" else Dataset.__name__
            continue
        if model is dict or model == Dataset.__name__:
            model = Profile if model is dict else Dataset
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation
    return sorted(getattr(model, "model_fields", {})) if isinstance(model, type) else []


def _explain(err: ValidationError, source: str) -> PolicyError:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(k for k in _allowed_keys(loc) if k != "sources")
            lines.append(f"{key}: unknown key; allowed keys here: {allowed}")
        elif isinstance(e.get("input"), dict):  # a whole table's check: its keys are named
            lines.append(f"{key}: {e['msg']}")
        else:
            lines.append(f"{key} = {e.get('input')!r}: {e['msg']}")
    return PolicyError(f"invalid policy ({source}):\n  " + "\n  ".join(lines))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise PolicyError(f"policy file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise PolicyError(f"policy file {path} cannot be read: {exc.strerror}") from None


def sample_path() -> Path:
    """The sample dataset shipped in the package (``cellblock/notebooks/sample.csv``)."""
    return Path(str(resources.files("cellblock.notebooks").joinpath("sample.csv")))


def find_policy_file(env: Mapping[str, str] | None = None) -> Path | None:
    """The operator's policy file: ``$CELLBLOCK_POLICY``, else ``cellblock.toml`` on the
    Jupyter config path (first match), else None."""
    env = os.environ if env is None else env
    explicit = env.get(POLICY_ENV)
    if explicit:
        return Path(explicit).expanduser()
    from jupyter_core.paths import jupyter_config_path

    for directory in jupyter_config_path():
        candidate = Path(directory) / POLICY_FILENAME
        if candidate.is_file():
            return candidate
    return None


def load_policy(path: Path | str | None = None, *, env: Mapping[str, str] | None = None) -> Policy:
    """Load the built-in policy merged with the operator file.

    ``path`` names the operator file explicitly; otherwise :func:`find_policy_file`
    decides. Raises :class:`PolicyError` with every problem, each naming its key.
    """
    builtin = tomllib.loads(resources.files("cellblock").joinpath("builtin.toml").read_text())
    builtin["datasets"][SAMPLE_DATASET]["path"] = str(sample_path())
    op_path = Path(path) if path is not None else find_policy_file(env)
    data, sources = builtin, ["builtin"]
    if op_path is not None:
        operator = _read_toml(op_path)
        data = _merge(builtin, operator)
        sources.append(str(op_path))
    env = os.environ if env is None else env
    if env.get(CGROUP_PARENT_ENV):  # lets an operator delegate a cgroup subtree per user
        data = _merge(data, {"host": {"cgroup_parent": env[CGROUP_PARENT_ENV]}})
        sources.append(f"${CGROUP_PARENT_ENV}")
    if env.get(JAIL_UIDS_ENV):  # e.g. set in a pod's image or manifest, not in a file
        data = _merge(data, {"host": {"jail_uids": env[JAIL_UIDS_ENV]}})
        sources.append(f"${JAIL_UIDS_ENV}")
    data["sources"] = tuple(sources)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, " + ".join(sources)) from None
    problems = check_profiles(policy)
    if problems:
        raise PolicyError(f"invalid policy ({' + '.join(sources)}):\n  " + "\n  ".join(problems))
    return policy
