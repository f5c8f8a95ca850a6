"""How errors of an SFTP connection are classified (keepwell.backends.sftp.classify): a refused
key is permanent and says what to check; a connection that went away while authenticating is a
lost connection, to be retried, not a key to check."""

from __future__ import annotations

import paramiko

from keepwell.backends.sftp import classify
from keepwell.errors import PermanentBackendError, StallError, TransientBackendError

WHAT = "writing tree/a2/x in sftp://backup@127.0.0.1:2222/repo: connecting to 127.0.0.1:2222"


def test_a_refused_key_is_permanent_and_says_what_to_check() -> None:
    err = classify(paramiko.AuthenticationException("Authentication failed."), WHAT)
    assert isinstance(err, PermanentBackendError)
    assert "authentication failed" in err.line() and "SSH key" in err.line()


def test_a_connection_lost_while_authenticating_is_retried_as_lost() -> None:
    exc = paramiko.AuthenticationException("Authentication failed: transport shut down or saw EOF")
    err = classify(exc, WHAT)
    assert isinstance(err, TransientBackendError)
    assert "connection lost" in err.line() and "SSH key" not in err.line()


def test_no_answer_while_authenticating_is_a_stall() -> None:
    """paramiko's auth_timeout expired: a server or link that froze during authentication,
    retried as a stall, not a key to check."""
    err = classify(paramiko.AuthenticationException("Authentication timeout."), WHAT, 15)
    assert isinstance(err, StallError)
    assert "stalled" in err.line() and "SSH key" not in err.line()


def test_a_key_of_a_refused_type_is_permanent() -> None:
    exc = paramiko.BadAuthenticationType("Bad authentication type", ["password"])
    assert isinstance(classify(exc, WHAT), PermanentBackendError)
