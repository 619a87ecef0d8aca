"""The seals in git's history: every key-holding version the providers folder ever had, by MAC.

A key-holding file carrying the MAC of an earlier version while its data differs was changed
outside sops (docs/reference.md §2.4). `plan`, `test` and `export` look a MAC up here to
name the version sops wrote it for.
"""

from __future__ import annotations

from service.config.loader import seal
from service.config.sops_mac import Known, Seal
from service.settings import Settings
from service.vcs.gitrepo import GitRepo


def history_seals(repo: GitRepo, settings: Settings, revs: list[str]) -> Known:
    """The seal of every key-holding version of the providers folder in the history of `revs`,
    by MAC, labelled with its path and commit. A MAC is the first version's that carried it,
    oldest first: sops wrote that one, a change cut from it came later."""
    revs = list(dict.fromkeys(revs))
    if not revs:
        return {}
    folder = repo.relative(settings.providers_dir)
    out = repo.run(
        "log", "-m", "--topo-order", "--reverse", "--format=%x00%H", "--raw", "--no-abbrev",
        "--no-renames", *revs, "--", folder,
    )  # fmt: skip
    versions: dict[str, str] = {}
    for chunk in out.decode("utf-8", "replace").split("\0")[1:]:
        commit, *lines = chunk.split("\n")
        for line in lines:
            meta, _, path = line.partition("\t")
            fields = meta.split()
            if line.startswith(":") and len(fields) >= 5 and fields[1] in ("100644", "100755"):
                versions.setdefault(fields[3], f"{path} at {commit[:10]}")
    contents = repo.blobs(list(versions))
    found: dict[str, tuple[str, Seal]] = {}
    for sha, label in versions.items():
        sealed = seal(label, contents[sha]) if b"sops" in contents[sha] else None
        if sealed is not None:
            found.setdefault(sealed.mac, (label, sealed))
    return found
