"""The one error a user sees for a bad setting: a one-line message naming the value (exit 2 in the CLI),
and the one wording for a Hub that cannot be reached."""

import os


class ConfigError(ValueError):
    """A bad or unsupported setting; the message is one line that names the value and what is allowed."""


def unreachable(err: BaseException) -> bool:
    """Whether an error (or its cause) means the Hub could not be reached: offline mode or no network."""
    names = ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "ConnectionError",
             "ConnectTimeout", "NameResolutionError", "MaxRetryError")  # fmt: skip
    seen = 0
    while err is not None and seen < 10:
        if (
            type(err).__name__ in names
            or "offline" in str(err).lower()
            or "connect" in type(err).__name__.lower()
        ):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def hub_unreachable(kind: str, name: str) -> str:
    from huggingface_hub import constants

    endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT)
    offline = bool(constants.HF_HUB_OFFLINE)
    cause = "HF_HUB_OFFLINE is set" if offline else "no network connection"
    return (
        f"{kind} {name!r} could not be reached at {endpoint} ({cause}) and is not in the local cache: "
        "download it first, or give a local path"
    )
