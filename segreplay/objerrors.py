"""Turns object-store errors into sentences that name the bucket and key and say what to do.

Only our own words and the store's short error code are shown: a store's raw message can
quote request details, and nothing here may ever print a secret.
"""

from __future__ import annotations

import enum
import re

from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

from segreplay.errors import FatalError


class Scheme(enum.Enum):
    S3 = "s3"
    GCS = "gs"


_CODE = re.compile(r"<Code>(\w+)</Code>")
_DENIED = ("AccessDenied", "AllAccessDisabled", "403 Forbidden")
_BAD_CREDENTIALS = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "401 Unauthorized",
)
_NO_CREDENTIALS = ("credential", "metadata", "Credential", "instance profile")
_NO_ANSWER = ("error sending request", "timed out", "Timeout", "connect", "dns error")
_PERMISSION = {
    (Scheme.S3, True): "s3:ListBucket",
    (Scheme.S3, False): "s3:GetObject",
    (Scheme.GCS, True): "storage.objects.list",
    (Scheme.GCS, False): "storage.objects.get",
}


def describe(
    error: BaseException, scheme: Scheme, bucket: str, key: str, *, listing: bool
) -> tuple[str, str]:
    """(message, hint) for an error met listing `key` (a prefix) or reading it."""
    text = str(error)
    code = _CODE.search(text)
    code_text = f" ({code.group(1)})" if code else ""
    where = f"{scheme.value}://{bucket}/{key}"
    action = "list" if listing else "read"
    credentials_hint = (
        "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE "
        "(for SSO run `aws sso login`)"
        if scheme is Scheme.S3
        else "check GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`"
    )
    if "NoSuchBucket" in text:
        return (
            f"{scheme.value}://{bucket}: the bucket does not exist",
            "check the bucket name, and the region (AWS_REGION) or AWS_ENDPOINT_URL",
        )
    if isinstance(error, UnauthenticatedError) or any(w in text for w in _BAD_CREDENTIALS):
        return f"{where}: the store refused the credentials{code_text}", credentials_hint
    if isinstance(error, PermissionDeniedError) or any(w in text for w in _DENIED):
        permission = _PERMISSION[(scheme, listing)]
        resource = f"arn:aws:s3:::{bucket}" + ("" if listing else "/*")
        on = f" on {resource}" if scheme is Scheme.S3 else f" on gs://{bucket}"
        return (
            f"{where}: access denied to {action}{code_text}",
            f"the credentials need the permission {permission}{on}",
        )
    if any(w in text for w in _NO_ANSWER):
        return (
            f"{where}: the store does not answer",
            "check the network, and AWS_ENDPOINT_URL if you set one",
        )
    if any(w in text for w in _NO_CREDENTIALS):
        return f"{where}: no credentials found", credentials_hint
    first = text.split("\n", 1)[0].split(": <?xml", 1)[0][:300]
    return f"{where}: could not {action}{code_text}: {first}", "check the URL and credentials"


def read_error(error: BaseException, scheme: Scheme, bucket: str, key: str) -> FatalError:
    """A read that failed for a reason every object shares (access, credentials, network):
    the run stops; the state keeps what was acknowledged, so the same command resumes."""
    message, hint = describe(error, scheme, bucket, key, listing=False)
    return FatalError(message, f"{hint}; then run the same command again to resume")
