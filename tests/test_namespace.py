"""The installed import names live under ``copgen``: a user project with its own ``flows/`` and
``storage/`` packages imports them alongside ours, neither shadowing the other (DESIGN "Packages")."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_a_user_projects_flows_and_storage_packages_do_not_collide_with_ours(tmp_path):
    for name in ("flows", "storage"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"WHOSE = 'user {name}'\n")
    script = textwrap.dedent("""
        import flows, storage
        import copgen.flows.plan, copgen.storage.cubes, copgen.records
        assert flows.WHOSE == "user flows" and storage.WHOSE == "user storage", (flows, storage)
        assert not hasattr(copgen.flows, "WHOSE") and not hasattr(copgen.storage, "WHOSE")
        assert copgen.storage.cubes.Cube.__module__ == "copgen.storage.cubes"
        print("ok", flows.__file__, copgen.flows.__file__)
    """)
    # cwd first on sys.path, as when a user runs a script in their project
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    user, ours = done.stdout.split()[1:]
    assert user.startswith(str(tmp_path)) and not ours.startswith(str(tmp_path))
