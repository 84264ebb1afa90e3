"""The policy: sizes, built-in profiles, the operator file and its errors (exact values)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellblock.errors import PolicyError, UnknownProfile
from cellblock.policy import (
    POLICY_ENV,
    Budgets,
    FilesPolicy,
    HostSettings,
    Limits,
    NetworkPolicy,
    OutputPolicy,
    Profile,
    find_policy_file,
    load_policy,
    parse_size,
    sample_path,
)

GiB, MiB, KiB = 1024**3, 1024**2, 1024
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_outside_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing from the calling environment (or another test's fixture) leaks in."""
    for name in (POLICY_ENV, "CELLBLOCK_CGROUP_PARENT", "JUPYTER_CONFIG_PATH"):
        monkeypatch.delenv(name, raising=False)


# -- parse_size ------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    (0, 0),
    (4096, 4096),
    ("0", 0),
    ("100", 100),
    ("100b", 100),
    ("1GiB", GiB),
    ("1gib", GiB),
    ("1G", GiB),
    ("1GB", GiB),  # units are binary whatever the spelling
    ("512M", 512 * MiB),
    ("512MiB", 512 * MiB),
    ("64kib", 64 * KiB),
    ("64K", 64 * KiB),
    ("2TiB", 2 * 1024**4),
    ("1.5GiB", 1610612736),
    (" 2 GiB ", 2 * GiB),
])
def test_parse_size_accepts(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(("value", "message"), [
    ("lots", "expected a size such as 512MiB, 1GiB or a number of bytes"),
    ("1XB", "expected a size such as 512MiB, 1GiB or a number of bytes"),
    ("GiB", "expected a size such as 512MiB, 1GiB or a number of bytes"),
    ("-1GiB", "expected a size such as 512MiB, 1GiB or a number of bytes"),
    ("", "expected a size such as 512MiB, 1GiB or a number of bytes"),
    (1.5, "expected a size such as 512MiB, 1GiB or a number of bytes"),
    (None, "expected a size such as 512MiB, 1GiB or a number of bytes"),
    (-1, "a size cannot be negative"),
    (True, "not a boolean"),
    (False, "not a boolean"),
])
def test_parse_size_refuses(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_size(value)


# -- built-in profiles -------------------------------------------------------------------

BUILTIN_LIMITS = {
    "agent": {"memory": GiB, "pids": 128, "cpus": 1.0, "tmp_size": 256 * MiB,
              "home_size": 64 * MiB, "open_files": 1024, "file_size": 256 * MiB,
              "warden_memory": GiB, "warden_cpus": 1.0},
    "analyst": {"memory": 4 * GiB, "pids": 512, "cpus": 2.0, "tmp_size": 2 * GiB,
                "home_size": 512 * MiB, "open_files": 4096, "file_size": 2 * GiB,
                "warden_memory": GiB, "warden_cpus": 1.0},
}
AGENT_REQUESTS = (
    "execute_request", "inspect_request", "complete_request", "is_complete_request",
    "kernel_info_request", "shutdown_request", "interrupt_request",
)


def test_builtin_profiles(operator) -> None:
    path = operator("")  # an empty operator file: the built-in policy alone
    policy = load_policy()
    assert policy.sources == ("builtin", str(path))
    assert sorted(policy.profiles) == ["agent", "analyst"]
    for name, limits in BUILTIN_LIMITS.items():
        assert policy.profile(name).limits.model_dump() == limits
    agent, analyst = policy.profile("agent"), policy.profile("analyst")
    for profile in (agent, analyst):  # no network in any built-in profile (docs/network.md)
        assert profile.network.allow == ()
    assert agent.model_dump(exclude={"limits", "budgets", "output", "files", "network"}) == {
        "display_name": "Python (cellblock: agent)",
        "description": "For LLM agents: small limits, no stdin, no comms or debugger.",
        "python": "auto",
        "nsjail_config": "python-kernel-no-net.cfg",
        "seccomp_policy": "seccomp-kernel.kafel",
        "cgroups": "required",
        "allow_stdin": False,
        "allowed_requests": AGENT_REQUESTS,
        "startup_timeout": 60.0,
        "warm_pool": 0,
        "datasets": ("sample",),
        "default_datasets": (),
        "enabled": True,
        "audit_code_text": False,
    }
    assert agent.budgets.model_dump() == {
        "cell_seconds": 30.0, "grace_seconds": 5.0, "lifetime_seconds": 3600.0,
        "idle_seconds": 600.0, "executions": 1000, "output_bytes": 10_000_000,
    }
    assert analyst.budgets.cell_seconds == 3600.0
    assert analyst.display_name == "Python (cellblock: analyst)"
    assert analyst.allow_stdin is True
    assert analyst.allowed_requests is None
    assert analyst.cgroups == "required"
    assert (analyst.datasets, analyst.default_datasets) == (("sample",), ())
    assert policy.host == HostSettings(nsjail="", cgroup_parent="cellblock", jail_uids="auto")


def test_builtin_sample_dataset(operator) -> None:
    """The quickstart's dataset: the CSV shipped in the package, wherever it is installed,
    allowed by both built-in profiles and granted to no launch that does not ask for it."""
    operator("")
    sample = load_policy().datasets["sample"]
    assert sample.path == str(sample_path())
    assert Path(sample.path).is_file()
    assert Path(sample.path).parts[-2:] == ("notebooks", "sample.csv")
    assert "AKIAQUICKSTARTFAKE23" in Path(sample.path).read_text()  # the planted fake key


def test_operator_may_move_the_sample(operator, tmp_path: Path) -> None:
    data = tmp_path / "mine.csv"
    data.write_text("a\n1\n")
    operator(f'[datasets.sample]\npath = "{data}"\n')
    assert load_policy().datasets["sample"].path == str(data)


def test_policy_is_frozen(operator) -> None:
    operator("")
    policy = load_policy()
    with pytest.raises(ValueError, match="frozen"):
        policy.profile("agent").limits.memory = 1  # type: ignore[misc]


def test_digest_ignores_sources(operator, tmp_path: Path) -> None:
    operator("")
    first = load_policy()
    other = tmp_path / "other.toml"
    other.write_text("# nothing\n")
    assert load_policy(other).digest() == first.digest()
    assert len(first.digest()) == 64


# -- the operator file -----------------------------------------------------------------

def test_operator_overrides_one_key_and_keeps_the_others(operator) -> None:
    operator('[profiles.agent.limits]\nmemory = "2GiB"\n')
    agent = load_policy().profile("agent")
    assert agent.limits.memory == 2 * GiB
    assert agent.limits.model_dump() == {**BUILTIN_LIMITS["agent"], "memory": 2 * GiB}
    assert agent.allowed_requests == AGENT_REQUESTS
    assert agent.display_name == "Python (cellblock: agent)"


def test_operator_adds_a_profile_with_model_defaults(operator) -> None:
    operator('[profiles.ci]\ndisplay_name = "CI"\ncgroups = "off"\n'
             '[profiles.ci.limits]\nmemory = "512MiB"\n')
    policy = load_policy()
    assert sorted(policy.profiles) == ["agent", "analyst", "ci"]
    ci = policy.profile("ci")
    assert ci.display_name == "CI"
    assert ci.cgroups == "off"
    # a new profile inherits nothing from agent: unset keys take the model's defaults
    assert ci.limits == Limits(memory=512 * MiB)
    assert ci.allow_stdin is False
    assert ci.allowed_requests is None


def test_operator_host_settings(operator) -> None:
    operator('[host]\ncgroup_parent = "jupyter/cellblock"\n')
    assert load_policy().host == HostSettings(nsjail="", cgroup_parent="jupyter/cellblock")


def test_unknown_key_names_it_and_lists_allowed(operator) -> None:
    path = operator('[profiles.agent]\nmemmory = "1GiB"\n')
    with pytest.raises(PolicyError) as info:
        load_policy()
    text = str(info.value)
    assert f"invalid policy (builtin + {path})" in text
    assert ("profiles.agent.memmory: unknown key; allowed keys here: allow_stdin, "
            "allowed_requests, audit_code_text, budgets, cgroups, datasets, default_datasets, "
            "description, display_name, enabled, files, limits, network, nsjail_config, output, "
            "python, seccomp_policy, startup_timeout") in text


@pytest.mark.parametrize(("text", "expected"), [
    ("[profiles.agent.limits]\nmemmory = 1\n",
     "profiles.agent.limits.memmory: unknown key; allowed keys here: cpus, file_size, "
     "home_size, memory, open_files, pids, tmp_size, warden_cpus, warden_memory"),
    ("[host]\nbinary = 1\n",
     "host.binary: unknown key; allowed keys here: cgroup_parent, jail_uids, nsjail"),
    ("colour = 1\n", "colour: unknown key; allowed keys here: audit, datasets, host, profiles"),
])
def test_unknown_key_at_each_level(operator, text: str, expected: str) -> None:
    operator(text)
    with pytest.raises(PolicyError, match="unknown key") as info:
        load_policy()
    assert expected in str(info.value)


@pytest.mark.parametrize(("text", "expected"), [
    ('[profiles.agent.limits]\nmemory = "lots"\n',
     "profiles.agent.limits.memory = 'lots': Value error, expected a size such as 512MiB, "
     "1GiB or a number of bytes"),
    ("[profiles.agent.limits]\npids = 2\n",
     "profiles.agent.limits.pids = 2: Input should be greater than or equal to 8"),
    ("[profiles.agent.limits]\nfile_size = 1024\n",
     "profiles.agent.limits.file_size = 1024: Input should be greater than or equal to 1048576"),
    ('[profiles.agent]\ncgroups = "maybe"\n',
     "profiles.agent.cgroups = 'maybe': Input should be 'required' or 'off'"),
    ('[host]\ncgroup_parent = "../escape"\n', "host.cgroup_parent = '../escape': String should "
     "match pattern"),
])
def test_bad_value_names_key_value_and_allowed(operator, text: str, expected: str) -> None:
    operator(text)
    with pytest.raises(PolicyError) as info:
        load_policy()
    assert expected in str(info.value)


def test_every_problem_is_listed(operator) -> None:
    operator('[profiles.agent.limits]\nmemory = "lots"\npids = 1\n')
    with pytest.raises(PolicyError) as info:
        load_policy()
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert lines[1].strip().startswith("profiles.agent.limits.memory = 'lots'")
    assert lines[2].strip().startswith("profiles.agent.limits.pids = 1")


def test_bad_profile_name(operator) -> None:
    operator('[profiles."Bad Name"]\n')
    with pytest.raises(PolicyError) as info:
        load_policy()
    text = str(info.value)
    assert "'Bad Name'" in text
    assert "^[a-z][a-z0-9_-]{0,39}$" in text


def test_invalid_toml_names_the_file(operator) -> None:
    path = operator("[profiles.agent\n")
    with pytest.raises(PolicyError, match=f"policy file {path} is not valid TOML"):
        load_policy()


def test_missing_policy_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    monkeypatch.setenv(POLICY_ENV, str(missing))
    with pytest.raises(PolicyError, match=f"policy file {missing} does not exist"):
        load_policy()


def test_unknown_profile_lists_known(operator) -> None:
    operator("")
    with pytest.raises(UnknownProfile) as info:
        load_policy().profile("nope")
    assert str(info.value) == "unknown profile 'nope'; known profiles: agent, analyst"
    assert isinstance(info.value, PolicyError)
    assert isinstance(info.value, KeyError)


def test_explicit_path_wins_over_env(operator, tmp_path: Path) -> None:
    operator("[profiles.from_env]\n")
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("[profiles.explicit]\n")
    assert "explicit" in load_policy(explicit).profiles
    assert "from_env" not in load_policy(explicit).profiles


def test_found_on_jupyter_config_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", "0")  # the user dir before the venv's
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path))
    path = tmp_path / "cellblock.toml"
    path.write_text("[profiles.found]\n")
    assert find_policy_file() == path
    policy = load_policy()
    assert policy.sources == ("builtin", str(path))
    assert "found" in policy.profiles


def test_env_variable_beats_jupyter_config_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path))
    (tmp_path / "cellblock.toml").write_text("")
    explicit = tmp_path / "explicit.toml"
    assert find_policy_file({POLICY_ENV: str(explicit)}) == explicit


# -- docs/policy.md names every key ---------------------------------------------------------

@pytest.mark.parametrize("model", [Limits, Profile, HostSettings, Budgets, OutputPolicy,
                                   FilesPolicy, NetworkPolicy])
def test_docs_name_every_key(model: type) -> None:
    text = (ROOT / "docs" / "policy.md").read_text()
    missing = [name for name in model.model_fields if f"`{name}`" not in text]
    assert missing == []


def test_docs_example_operator_file_loads(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "policy.md").read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "cellblock.toml"
    path.write_text(example)
    policy = load_policy(path)
    assert sorted(policy.profiles) == ["agent", "analyst", "ci"]
    assert policy.profile("agent").limits.memory == 2 * GiB
    assert policy.profile("ci").cgroups == "off"


@pytest.mark.parametrize(("entry", "message"), [
    ("user@pypi.org", "no userinfo"),
    ("pypi.org/simple", "no userinfo, path"),
    ("*pypi.org", "'\\*' only as a whole first label"),
    ("*.org.*", "'\\*' only as a whole first label"),
    ("*.com", "two labels or more"),
    ("*.10.0.0.1", "looks like a numeric address|two labels"),
    ("pypi.org:0", "port '0'"),
    ("pypi.org:99999", "port '99999'"),
    ("::1", "needs brackets"),
    ("127.1", "numeric address"),
    ("pyp_i.org", "only letters, digits"),
])
def test_network_allow_entries_are_checked(operator, entry: str, message: str) -> None:
    operator(f"[profiles.agent.network]\nallow = [{entry!r}]\n".replace("'", '"'))
    with pytest.raises(PolicyError, match=message) as info:
        load_policy()
    assert "profiles.agent.network.allow" in str(info.value)


def test_network_is_off_unless_allowed(operator) -> None:
    operator('[profiles.net.network]\nallow = ["PyPI.org.", "*.Example.com:8443"]\n')
    policy = load_policy()
    assert policy.profile("agent").network == NetworkPolicy()
    rules = policy.profile("net").network.rules()
    assert [(r.host, r.wildcard, r.ports) for r in rules] == [
        ("pypi.org", False, (80, 443)), ("example.com", True, (8443,))]
