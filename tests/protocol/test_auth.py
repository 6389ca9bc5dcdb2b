"""The AUTH credential math (protocol-spec.md §7.1), fed bytes only."""

from __future__ import annotations

import pytest

from muxtunnel.protocol import auth

NONCE_S = bytes(range(32))
NONCE_C = bytes(range(32, 64))


def test_method_1_matches_its_own_token_only() -> None:
    cred = auth.hmac_credential("right", NONCE_S, NONCE_C)
    assert auth.check_mac(["wrong", None, "right"], NONCE_S, cred) == 2
    assert auth.check_mac(["wrong", None], NONCE_S, cred) is None
    assert auth.check_mac(["right"], bytes(32), cred) is None  # another challenge


def test_method_2_matches_by_stored_key_only() -> None:
    cred = auth.stored_key_credential("right", NONCE_S, NONCE_C)
    keys = [auth.stored_key("wrong"), auth.stored_key("right")]
    assert auth.check_proof(keys, NONCE_S, cred) == 1
    assert auth.check_proof(keys[:1], NONCE_S, cred) is None
    assert auth.check_proof(keys, bytes(32), cred) is None
    # The stored key alone does not make a credential: the proof needs the client key.
    forged = NONCE_C + auth.stored_key("right")
    assert auth.check_proof(keys, NONCE_S, forged) is None


@pytest.mark.parametrize("size", [0, 32, 63, 65, 128])
def test_credentials_of_the_wrong_size_match_nothing(size: int) -> None:
    cred = bytes(size)
    assert auth.check_mac(["t"], NONCE_S, cred) is None
    assert auth.check_proof([auth.stored_key("t")], NONCE_S, cred) is None
