"""Credentials where they must never be: inside a setting's value. A value is stored in the RayJob that
`ray-detect submit` creates, in the output's settings and manifest, and in the log; a secret in it would
be stored in each. One function finds them, for the config's check (app.config), for `ray-detect run`'s
overrides before Hydra composes them (its errors may quote a value) and for `ray-detect submit` before it
prints or creates anything. What it reports names the setting and the form, never the secret.

The forms found, case-insensitively:
- user-info in a URI, `scheme://user:password@host`, the user possibly empty (`scheme://:secret@host`)
  and the password possibly holding slashes (as AWS secret keys do; pyarrow and fsspec accept them);
- a query parameter that carries a secret or a signature: presigned S3 URLs (X-Amz-Signature,
  X-Amz-Credential, X-Amz-Security-Token), signed GCS URLs (X-Goog-Signature, X-Goog-Credential), Azure
  SAS tokens (sig), OAuth (client_secret, access_token, token) and password.
Not a credential: `https://host:8080/a@b.pt` (a port, then a path holding "@") on schemes whose host may
have a port; on object stores (s3, gs, abfs, ...) the host is a bucket or container, which has none, so
`s3://key:1234/secret@bucket` is one.
"""

import re
from typing import Iterable, Optional

# Query parameters whose value is a secret or a signature that grants access.
SECRET_QUERY_PARAMETERS = (
    "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "X-Goog-Signature", "X-Goog-Credential",
    "sig", "client_secret", "access_token", "token", "password",
)
SECRET_QUERY = re.compile(
    r"[?&;](" + "|".join(re.escape(name) for name in SECRET_QUERY_PARAMETERS) + r")=[^&#\s'\"]", re.IGNORECASE)
URI_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# Where a URI's user-info and host end for this search: a query, a fragment, blanks and quotes.
AUTHORITY_END = re.compile(r"[\s'\"?#]")
# Schemes whose "host" is a bucket or a container: never followed by a port.
OBJECT_STORE_SCHEMES = frozenset({"s3", "s3a", "s3n", "gs", "gcs", "abfs", "abfss", "az", "adl"})
# A Hydra override's key (`data.path`, `+x.y`, `~x`, `group@package`); anything else is not repeated.
OVERRIDE_KEY = re.compile(r"[+~]{0,2}[A-Za-z_][\w.@/-]*")


def credential_in(text: str) -> Optional[str]:
    """The form of the first credential `text` holds, in words that do not repeat it; None when it holds none."""
    for start in URI_START.finditer(text):
        scheme = start.group()[:-3].lower()
        authority = AUTHORITY_END.split(text[start.end():], maxsplit=1)[0]
        if "@" not in authority:
            continue
        user_info = authority[: authority.rindex("@")]
        if "://" in user_info or ":" not in user_info:  # another URI's, or a user without a password
            continue
        user, secret = user_info.split(":", 1)
        if "/" in user or not secret:
            continue
        port, slash, _ = secret.partition("/")
        if slash and scheme not in OBJECT_STORE_SCHEMES and (port == "" or (port.isdigit() and int(port) <= 65535)):
            continue  # host:port/path@... : the "@" is the path's
        return "user:password@ in its URI"
    query = SECRET_QUERY.search(text)
    if query:
        return f"{query.group(1)}= in its query string"
    return None


def credentials_message(key: str, form: str) -> str:
    """The one line that refuses a setting holding a credential of this form, without its value."""
    return (f"{key} holds credentials ({form}); give them to the storage client through its environment "
            "(AWS_ACCESS_KEY_ID, ...) or a mounted Secret instead")


def setting_with_credentials(settings: Iterable[tuple[str, object]]) -> Optional[str]:
    """The refusal of the first (key, value) whose value is a string holding a credential; None when none does."""
    for key, value in settings:
        form = credential_in(value) if isinstance(value, str) else None
        if form:
            return credentials_message(key, form)
    return None


def override_with_credentials(overrides: Iterable[str]) -> Optional[str]:
    """The refusal of the first Hydra override (`key=value`) holding a credential, naming its key (or its
    position, when what precedes "=" is no key); None when none does."""
    for number, override in enumerate(overrides, 1):
        key, equals, value = override.partition("=")
        is_key = bool(equals) and OVERRIDE_KEY.fullmatch(key) is not None
        form = credential_in(value if is_key else override)
        if form:
            return credentials_message(key.lstrip("+~") if is_key else f"override {number}", form)
    return None
