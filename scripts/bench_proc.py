"""Process facts shared by the benchmark drivers (bench-kube.py, bench-data.py)."""

from pathlib import Path


def postgres_pids():
    """The pids of every PostgreSQL process (server and backends)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == "postgres":
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids
