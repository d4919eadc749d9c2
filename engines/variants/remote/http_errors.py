"""What went wrong talking to a remote server, in one line for the user: which URL, doing what, and
whether it timed out, answered with an HTTP error, or could not be reached at all."""
from __future__ import annotations


def explain_http_error(error: BaseException, where: str, doing: str, timeout_s: float) -> str:
    """`where` names the engine and URL; `doing` is what the client was doing ("listing its models")."""
    import httpx
    import openai
    if isinstance(error, (openai.APITimeoutError, httpx.TimeoutException)):
        return f"{where} did not answer within {timeout_s:.0f} s while {doing}"
    if isinstance(error, openai.APIStatusError):
        return f"{where} returned HTTP {error.status_code} while {doing}: {_first_line(error.message)}"
    if isinstance(error, (openai.APIConnectionError, httpx.TransportError)):
        cause = error.__cause__ or error
        return f"{where} is unreachable or closed the connection while {doing}: {_first_line(str(cause))}"
    return f"{where} failed while {doing}: {type(error).__name__}: {_first_line(str(error))}"


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else "(no detail)"
