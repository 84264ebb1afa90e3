"""Datasets in the policy and in the jail command: exact values, no jail started."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellblock.datasets import Dataset, parse_selection, select_datasets
from cellblock.errors import PolicyError
from cellblock.jailcmd import JailLayout, nsjail_argv
from cellblock.policy import Profile, load_policy

pytestmark = [pytest.mark.nonroot]

POLICY = """
[datasets.sales]
path = "/srv/data/sales.csv"
description = "Daily sales, 2024"
[datasets.weather]
path = "/srv/data/weather"
[datasets.hr]
path = "/srv/data/hr.csv"

[profiles.agent]
datasets = ["sales", "weather"]
default_datasets = ["sales"]
"""



def test_policy_shape_from_the_issue(operator) -> None:
    operator(POLICY)
    policy = load_policy()
    assert policy.datasets["sales"] == Dataset(path="/srv/data/sales.csv",
                                               description="Daily sales, 2024")
    assert policy.datasets["weather"].description == ""
    agent = policy.profile("agent")
    assert agent.datasets == ("sales", "weather")
    assert agent.default_datasets == ("sales",)
    assert policy.profile("analyst").datasets == ("sample",)  # the built-in's


@pytest.mark.parametrize(("requested", "expected"), [
    (None, ("sales",)),
    ("", ("sales",)),
    (" , ", ("sales",)),
    ("weather", ("weather",)),
    ("weather, sales,weather", ("weather", "sales")),
])
def test_select(operator, requested: str | None, expected: tuple[str, ...]) -> None:
    operator(POLICY)
    assert select_datasets(load_policy(), "agent", requested) == expected


@pytest.mark.parametrize(("requested", "message"), [
    ("hr", "dataset 'hr' (from $CELLBLOCK_DATASETS) is not allowed by profile 'agent'; it "
           "allows: sales, weather"),
    ("sales,nosuch", "dataset 'nosuch' (from $CELLBLOCK_DATASETS) is not allowed by profile "
                     "'agent'"),
    ("../etc", "dataset '../etc' (from $CELLBLOCK_DATASETS) is not allowed"),
])
def test_select_refuses_outside_the_profile(operator, requested: str,
                                            message: str) -> None:
    operator(POLICY)
    with pytest.raises(PolicyError) as info:
        select_datasets(load_policy(), "agent", requested)
    assert str(info.value).startswith(message)


def test_profile_without_datasets_allows_none(operator) -> None:
    operator(POLICY + "[profiles.plain]\n")
    assert select_datasets(load_policy(), "plain", None) == ()
    with pytest.raises(PolicyError, match="it allows: none"):
        select_datasets(load_policy(), "plain", "sales")


def test_parse_selection() -> None:
    assert parse_selection("a,b, a ,,c") == ("a", "b", "c")
    assert parse_selection("") == ()


@pytest.mark.parametrize(("text", "expected"), [
    ('[profiles.agent]\ndatasets = ["nosuch"]\n',
     "profiles.agent.datasets: unknown dataset 'nosuch'; datasets defined: sample"),
    (POLICY + '[profiles.analyst]\ndefault_datasets = ["sales"]\n',
     "profiles.analyst.default_datasets: 'sales' not in profiles.analyst.datasets"),
    ('[datasets.x]\npath = "relative/x"\n', "datasets.x.path = 'relative/x': Value error, "
                                            "must be an absolute path"),
    ('[datasets.x]\npath = "/srv/a:b"\n', "must not contain ':'"),
    ('[datasets.x]\npath = "/srv/../etc"\n', "must be a normalised path"),
    ('[datasets.x]\npath = "/srv/x/"\n', "must be a normalised path"),
    ('[datasets.x]\npath = "/"\n', "must be a normalised path"),
    ('[datasets.x]\npath = "/srv/x"\ndescription = "two\\nlines"\n', "must be one line"),
    ('[datasets.x]\npath = "/srv/x"\nowner = "me"\n',
     "datasets.x.owner: unknown key; allowed keys here: description, path"),
    ('[datasets."Bad Name"]\npath = "/srv/x"\n', "'Bad Name'"),
    ('[datasets.x]\n', "datasets.x.path"),
])
def test_bad_dataset_policy(operator, text: str, expected: str) -> None:
    path = operator(text)
    with pytest.raises(PolicyError) as info:
        load_policy()
    assert f"invalid policy (builtin + {path}" in str(info.value)
    assert expected in str(info.value)


# -- the jail command ----------------------------------------------------------------------

LAYOUT = JailLayout(
    ipc_dir=Path("/run/cellblock/k1/ipc"), pkg_dir=Path("/run/cellblock/k1/pkg"),
    passwd=Path("/run/cellblock/k1/passwd"), group=Path("/run/cellblock/k1/group"),
    outside_uid=1073741825, outside_gid=1073741826,
    broker_dir=Path("/run/cellblock/k1/broker"),
)


@pytest.fixture
def profile(tmp_path: Path) -> Profile:
    cfg, kafel = tmp_path / "base.cfg", tmp_path / "policy.kafel"
    cfg.write_text('name: "test"\n')
    kafel.write_text("USE allow_all DEFAULT KILL\n")
    return Profile(nsjail_config=str(cfg), seccomp_policy=str(kafel))


def test_broker_dir_and_data_mounts_in_argv(profile: Profile) -> None:
    argv = nsjail_argv(nsjail="/usr/bin/nsjail", profile=profile, layout=LAYOUT,
                       python=Path("/opt/env/bin/python3"), env_mounts=(),
                       data_mounts=(("weather", Path("/run/cellblock/k1/mnt/weather")),
                                    ("archive", Path("/srv/archive"))))
    binds = [argv[i + 1] for i, a in enumerate(argv) if a == "--bindmount_ro"]
    assert binds[-4:] == [
        "/run/cellblock/k1/broker:/run/cellblock-broker",
        "/run/cellblock/k1/mnt/weather:/data/weather",
        "/srv/archive:/data/archive",
        "/run/cellblock/k1/ipc:/run/cellblock",  # the warden's sockets: read-only too
    ]
    # no read-write bind at all: not a dataset, not the broker dir, not the ipc dir
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--bindmount"] == []


@pytest.mark.parametrize(("mount", "message"), [
    (("w", Path("/srv/a:b")), "contains ':'"),
    (("w", Path("rel")), "must be an absolute path"),
    (("../x", Path("/srv/x")), "cannot be a mount point"),
    (("a/b", Path("/srv/x")), "cannot be a mount point"),
])
def test_bad_data_mounts_refused(profile: Profile, mount: tuple[str, Path],
                                 message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        nsjail_argv(nsjail="/usr/bin/nsjail", profile=profile, layout=LAYOUT,
                    python=Path("/opt/env/bin/python3"), env_mounts=(), data_mounts=(mount,))
