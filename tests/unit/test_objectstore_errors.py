"""How errors from an S3 store are classified (keepwell.backends.objectstore.classify).

The texts are those obstore gives for a SeaweedFS 4.48 gateway's answers.
"""

from __future__ import annotations

from obstore.exceptions import GenericError

from keepwell.backends.objectstore import classify
from keepwell.errors import PermanentBackendError, TransientBackendError

# a DeleteObjects request answered 200 with an error for the key (how obstore deletes on S3)
DELETE_DENIED = ('Generic S3 error: DeleteObjects request failed for key x/a: Access Denied. '
                 '(code: AccessDenied)\n\nDebug source:\nGeneric {\n    store: "S3",\n    source: '
                 'DeleteFailed {\n        path: "x/a",\n        code: "AccessDenied",\n        '
                 'message: "Access Denied.",\n    },\n}')


def test_a_delete_denied_per_key_is_permanent_and_says_access_denied() -> None:
    err = classify(GenericError(DELETE_DENIED), "deleting x/a in s3://b/x")
    assert isinstance(err, PermanentBackendError)
    assert str(err).startswith("deleting x/a in s3://b/x: access denied: ")
    assert err.hint == "check the credentials and their permissions"


def test_another_per_key_delete_failure_is_still_tried_again() -> None:
    text = DELETE_DENIED.replace("AccessDenied", "InternalError")
    assert isinstance(classify(GenericError(text), "deleting x/a"), TransientBackendError)
