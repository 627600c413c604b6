"""`pvtap init`: the `.env` the Compose stack reads, with freshly generated secrets.

compose.yaml names every secret as `${VAR:?...}`, so Compose refuses to start without this file
and says which variable is missing. The repository holds no default password or token.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path

from pvtap.config import Config
from pvtap.mqtt.broker import MQTT_USER, new_password, write_password_file

ENV_FILE = ".env"

EPILOG = """\
what it writes (mode 0600; .env is git-ignored):
  INFLUXDB_ADMIN_PASSWORD, INFLUXDB_ADMIN_TOKEN   generated; InfluxDB's first start sets them up,
                                                   pvtap writes and Grafana reads with the token
  GRAFANA_ADMIN_PASSWORD                           generated; log in to Grafana as admin with it
  with --mqtt: COMPOSE_PROFILES=mqtt (the broker), PVTAP_MQTT_URL, MQTT_PASSWORD (generated),
               and mosquitto/passwd (mode 0600), the broker's password file
  INFLUXDB_ORG, INFLUXDB_BUCKET, TZ, ...           the other values compose.yaml reads

then:
  docker compose up -d            the stack: pvtap, InfluxDB 2, Grafana on http://<this host>:3000
                                  (and Mosquitto on port 1883 with --mqtt)
  pvtap firewall --help           the rules that send your devices' traffic to pvtap

InfluxDB takes its admin password and token only on its first start. After that, a new .env
(--force) does not change them: keep the old values, or start over with `docker compose down -v`
(which deletes the stored data)."""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "init", help="write the .env of the Docker Compose stack, with generated passwords and token",
        description="Write the .env file that compose.yaml reads: a generated InfluxDB admin password and API "
                    "token, a generated Grafana admin password, the InfluxDB organisation and bucket, and the "
                    "time zone. Refuses to overwrite an existing .env unless --force is given.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("."), metavar="DIR",
                        help="the directory holding compose.yaml (default: the current one)")
    parser.add_argument("--force", action="store_true", help="replace an existing .env (new secrets!)")
    parser.add_argument("--org", default="pvtap", help="InfluxDB organisation (default: pvtap)")
    parser.add_argument("--bucket", default="pvtap", help="InfluxDB bucket (default: pvtap)")
    parser.add_argument("--tz", help="time zone of the house, e.g. Europe/Berlin (default: this host's)")
    parser.add_argument("--mqtt", action="store_true",
                        help="also the Mosquitto broker of compose.yaml (for Home Assistant): its profile and a "
                             "generated password in .env, the broker's password file in mosquitto/passwd")
    parser.set_defaults(func=run)


def host_timezone() -> str:
    """The host's zone name (TZ, /etc/timezone, the /etc/localtime link), else UTC."""
    if os.environ.get("TZ"):
        return os.environ["TZ"].lstrip(":")
    try:
        return Path("/etc/timezone").read_text().strip() or "UTC"
    except OSError:
        pass
    link = Path("/etc/localtime")
    if link.is_symlink():
        target = str(link.resolve())
        if "zoneinfo/" in target:
            return target.split("zoneinfo/", 1)[1]
    return "UTC"


def env_values(org: str, bucket: str, tz: str) -> dict[str, str]:
    """Every variable compose.yaml reads, secrets freshly generated."""
    return {
        "TZ": tz,
        "INFLUXDB_ADMIN_USER": "admin",
        "INFLUXDB_ADMIN_PASSWORD": secrets.token_urlsafe(24),
        "INFLUXDB_ADMIN_TOKEN": secrets.token_urlsafe(48),
        "INFLUXDB_ORG": org,
        "INFLUXDB_BUCKET": bucket,
        "GRAFANA_ADMIN_USER": "admin",
        "GRAFANA_ADMIN_PASSWORD": secrets.token_urlsafe(24),
    }


def render(values: dict[str, str]) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# pvtap full stack: written by `pvtap init` on {stamp}.",
             "# Secrets: keep this file to yourself (mode 0600, git-ignored). InfluxDB takes the admin",
             "# password and token on its first start only; see `pvtap init --help`."]
    lines += [f"{key}={value}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


_SAFE = re.compile(r"[A-Za-z0-9_./+:-]+")


def run(args: argparse.Namespace, config: Config) -> int:
    directory: Path = args.dir
    if not directory.is_dir():
        print(f"pvtap init: {directory} is not a directory. Fix: --dir the directory holding compose.yaml",
              file=sys.stderr)
        return 2
    values = env_values(args.org, args.bucket, args.tz or host_timezone())
    for key in ("TZ", "INFLUXDB_ORG", "INFLUXDB_BUCKET"):
        if not _SAFE.fullmatch(values[key]):
            option = "--" + key.removeprefix("INFLUXDB_").lower()
            print(f"pvtap init: {key} = {values[key]!r}: use letters, digits and ./+:_- only. Fix: {option} ...",
                  file=sys.stderr)
            return 2
    path = directory / ENV_FILE
    if path.exists() and not args.force:
        print(f"pvtap init: {path} exists; kept it. Fix: --force to replace it with new secrets (InfluxDB keeps "
              "the ones of its first start: see --help)", file=sys.stderr)
        return 1
    if args.mqtt:
        password = new_password()
        values.update(COMPOSE_PROFILES="mqtt", PVTAP_MQTT_URL="mqtt://127.0.0.1:1883", MQTT_PASSWORD=password)
        write_password_file(directory / "mosquitto" / "passwd", MQTT_USER, password)
    write_private(path, render(values))
    print(f"wrote {path} (mode 0600): InfluxDB org {values['INFLUXDB_ORG']!r}, bucket "
          f"{values['INFLUXDB_BUCKET']!r}, time zone {values['TZ']}, generated admin password and token, "
          "generated Grafana admin password")
    if args.mqtt:
        print(f"  and the MQTT broker: user {MQTT_USER}, MQTT_PASSWORD in .env; {directory / 'mosquitto' / 'passwd'} "
              "(mode 0600) for mosquitto")
        print("next: docker compose up -d  (.env turns on the profile mqtt: the broker on port 1883 as well; Home "
              "Assistant's MQTT integration connects to it as user pvtap with MQTT_PASSWORD)")
    else:
        print("next: docker compose up -d  (then Grafana on http://<this host>:3000, user admin, password in .env)")
    return 0


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600 from the first byte (never readable by others)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)  # whatever the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
