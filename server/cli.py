"""`edge-server`: the aggregation server's command line (thin over server.service / server.rounds)."""

from __future__ import annotations

import getpass
import json
import socket
from pathlib import Path

import click

from edge_runtime.bundle import default_public_key_path
from edge_runtime.cliutil import handle_errors
from edge_runtime.errors import BadInput
from edge_runtime.keys import load_public_key

from .home import Config, Home, default_home


def home_option(fn):
    return click.option("--home", type=click.Path(path_type=Path), default=None, envvar="EDGE_SERVER_HOME",
                        help="Server folder: keys, blobs, config, SQLite database [default: ~/.dwfl-server].")(fn)


def db_option(fn):
    return click.option("--db", "db_url", default=None, envvar="EDGE_SERVER_DB",
                        help="Database URL, e.g. postgresql://user@host/db [default: config, else SQLite in HOME].")(fn)


def open_server(home: Path | None, db_url: str | None):
    from .service import Server

    return Server(Home(home or default_home()), db_url)


@click.group()
@click.version_option(package_name="dwfl-edge")
def main() -> None:
    """dwfl-edge aggregation server: enrollment, signed requests, sealed updates, DW-FL rounds."""


@main.command()
@home_option
@db_option
@click.option("--min-clients", default=3, show_default=True, type=click.IntRange(1, 100_000), help="A round closes at this many updates...")
@click.option("--round-seconds", default=86400.0, show_default=True, type=click.FloatRange(1, None), help="...or this long after it opened.")
@click.option("--max-staleness", default=2, show_default=True, type=click.IntRange(0, 100), help="Refuse updates more rounds old than this.")
@click.option("--max-body-mb", default=16.0, show_default=True, type=click.FloatRange(0.01, 1024), help="Largest request body.")
@click.option("--lease-seconds", default=600.0, show_default=True, type=click.FloatRange(1, None),
              help="An aggregation claimed longer ago than this (crashed server) is taken over.")
@handle_errors
def init(home: Path | None, db_url: str | None, min_clients: int, round_seconds: float, max_staleness: int, max_body_mb: float,
         lease_seconds: float) -> None:
    """Create the server's Ed25519 and HPKE key pairs (mode 0600), its config and its database."""
    h = Home(home or default_home())
    h.init(Config(db_url=db_url or "", min_clients=min_clients, round_seconds=round_seconds, max_staleness=max_staleness,
                  max_body_bytes=int(max_body_mb * 2**20), lease_seconds=lease_seconds))
    srv = open_server(h.root, None)
    click.echo(f"server folder {h.root}\nsigning key {srv.key_id}\ndatabase {srv.engine.url.render_as_string(hide_password=True)}")


@main.command()
@home_option
@db_option
@click.option("--clinic", required=True, help="Name the token enrolls (a clinic's or a hospital's).")
@click.option("--tier", default="clinic", show_default=True, type=click.Choice(["clinic", "hospital"]),
              help="clinic: sends head updates (edge-run enroll); hospital: trains the teacher (edge-export enroll).")
@handle_errors
def token(home: Path | None, db_url: str | None, clinic: str, tier: str) -> None:
    """Print a one-time enrollment token (carries the tier and the server key fingerprint)."""
    click.echo(open_server(home, db_url).issue_token(clinic, tier))


@main.command()
@home_option
@db_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8443, show_default=True, type=click.IntRange(1, 65535))
@click.option("--tick", default=2.0, show_default=True, type=click.FloatRange(0.05, 3600), help="Seconds between round checks.")
@click.option("--log-level", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
              help="Server log records (stderr, one line each: request id, clinic, round).")
@handle_errors
def serve(home: Path | None, db_url: str | None, host: str, port: int, tick: float, log_level: str) -> None:
    """Serve the sync API (put TLS in front in production: a reverse proxy)."""
    import uvicorn

    from .app import create_app
    from .logs import configure
    from .malloc import limit_arenas

    configure(log_level)
    limit_arenas()  # before the server's threads exist
    srv = open_server(home, db_url)
    app = create_app(srv, tick)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=30, limit_concurrency=srv.config.max_connections)


@main.command()
@home_option
@db_option
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--trusted-key", type=click.Path(path_type=Path), default=None, help="Exporter's public key [default: BUNDLE.pub].")
@handle_errors
def publish(home: Path | None, db_url: str | None, bundle: Path, trusted_key: Path | None) -> None:
    """Set the starting global model: verify BUNDLE, re-sign it with the server key, open a round on it."""
    srv = open_server(home, db_url)
    version, rid = srv.publish_bundle(bundle, load_public_key(trusted_key or default_public_key_path(bundle)))
    click.echo(f"published version {version}; round {rid} open")


@main.command("publish-teacher")
@home_option
@db_option
@click.argument("folder", type=click.Path(path_type=Path))
@handle_errors
def publish_teacher(home: Path | None, db_url: str | None, folder: Path) -> None:
    """Start the teacher federation: FOLDER (from `edge-export teacher-init`) becomes the first global
    teacher, signed with the server key; a teacher round opens on it."""
    from .teacher import publish_teacher as publish

    version, rid = publish(open_server(home, db_url), folder)
    click.echo(f"published teacher version {version}; teacher round {rid} open")


@main.command("rounds")
@home_option
@db_option
@click.option("--close-due", is_flag=True, help="Aggregate every round that is due now (what `serve` does on its own).")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def rounds_cmd(home: Path | None, db_url: str | None, close_due: bool, as_json: bool) -> None:
    """Rounds, arrivals and aggregation weights."""
    from . import rounds as rounds_mod

    srv = open_server(home, db_url)
    if close_due:
        rounds_mod.tick(srv)
    report = srv.rounds_report()
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    for r in report:
        click.echo(f"round {r['id']}  {r['federation']:<7}  base v{r['base_version']}  {r['state']:<11} updates {r['n_updates']}/{r['min_clients']}"
                   + (f"  -> v{r['result_version']}" if r["result_version"] else ""))
        rep = r.get("report") or {}
        if rep.get("error"):
            click.echo(f"  not aggregated: {rep['error']}")
        weights, rejected = (rep.get("weights") or {}).get("shared", {}), dict(rep.get("rejected") or [])
        for a in r["arrivals"]:
            w = weights.get(a["clinic"])
            click.echo(f"  {a['clinic']:<24} n={a['n']:<6} staleness {a['staleness']}" + (f"  weight {w:.4f}" if w is not None else "")
                       + (f"  rejected: {rejected[a['clinic']]}" if a["clinic"] in rejected else ""))
        for d in r.get("dropped", []):
            click.echo(f"  {d['clinic']:<24} dropped {d['update_id']} ({d['reason']}, by {d['dropped_by']})")


@main.command()
@home_option
@db_option
@click.option("--clinic", required=True)
@handle_errors
def revoke(home: Path | None, db_url: str | None, clinic: str) -> None:
    """Refuse every further request from this clinic (403) and drop its updates from the rounds not yet aggregated."""
    done = open_server(home, db_url).revoke(clinic, by=operator())
    if done is None:
        raise BadInput(f"no enrolled, unrevoked clinic {clinic!r}")
    click.echo(f"revoked {clinic}")
    for rid, ids in sorted(done.dropped.items()):
        click.echo(f"dropped from round {rid}: {', '.join(ids)}")


def operator() -> str:
    """Who ran the command, for the record (user@host)."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name (a container without a passwd entry): still record the host
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


if __name__ == "__main__":
    main()
