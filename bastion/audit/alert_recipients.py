"""Who is told of a security alert: the usernames of infra/alert-recipients.yaml, checked when the service starts."""

import re
from pathlib import Path

import yaml

from bastion.devstack.errors import DevstackError

USERNAME = re.compile(r"[a-z0-9][a-z0-9._@-]{0,99}")
MAX_RECIPIENTS = 50


def parse_alert_recipients(raw: object, source: str = "alert recipients") -> tuple[str, ...]:
    """The recipients of a parsed recipients file, in its order; anything unexpected is refused with a message
    naming it."""
    if not isinstance(raw, dict) or set(raw) != {"recipients"} or not isinstance(raw["recipients"], list):
        raise DevstackError(f"{source}: expected a mapping with one key, `recipients`, holding a list of usernames",
                            "see infra/alert-recipients.yaml")
    names = raw["recipients"]
    wrong = [repr(name) for name in names if not isinstance(name, str) or not USERNAME.fullmatch(name)]
    if wrong:
        raise DevstackError(f"{source}: not a username: {', '.join(wrong)[:300]}",
                            "lower-case letters, digits and . _ @ -, as Keycloak keeps usernames")
    if len(set(names)) != len(names):
        raise DevstackError(f"{source}: a recipient is listed twice", "list each person once")
    if not 1 <= len(names) <= MAX_RECIPIENTS:
        raise DevstackError(f"{source}: {len(names)} recipients; expected 1 to {MAX_RECIPIENTS}",
                            "an alert nobody is told of would be silent")
    return tuple(names)


def load_alert_recipients(path: Path) -> tuple[str, ...]:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise DevstackError(f"cannot read the alert recipients {path}: {error}",
                            "see infra/alert-recipients.yaml") from None
    return parse_alert_recipients(raw, str(path))
