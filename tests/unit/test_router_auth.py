"""API-key checks: constant-time compare, Bearer header and gRPC metadata forms."""

from __future__ import annotations

from lmfleet.router.auth import API_KEY_ENV, ApiKeyAuth, api_key_from_env, keys_match


def test_keys_match_only_identical_keys():
    assert keys_match("s3cret", "s3cret")
    assert not keys_match("s3cret", "s3cre")
    assert not keys_match("s3cret", "s3cret ")
    assert not keys_match("s3cret", "")
    assert keys_match("ключ", "ключ")  # non-ASCII keys compare as UTF-8 bytes


def test_bearer_header_is_required_when_a_key_is_set():
    auth = ApiKeyAuth("k1")
    assert auth.authorized("Bearer k1")
    assert auth.authorized("bearer k1")
    assert not auth.authorized("Bearer k2")
    assert not auth.authorized("k1")
    assert not auth.authorized("Basic k1")
    assert not auth.authorized(None)


def test_without_a_key_everything_is_allowed():
    auth = ApiKeyAuth(None)
    assert not auth.enabled
    assert auth.authorized(None)
    assert auth.authorized_metadata(())


def test_grpc_metadata_is_checked_case_insensitively():
    auth = ApiKeyAuth("k1")
    assert auth.authorized_metadata((("x-other", "1"), ("authorization", "Bearer k1")))
    assert not auth.authorized_metadata((("authorization", "Bearer nope"),))
    assert not auth.authorized_metadata((("x-other", "Bearer k1"),))


def test_the_key_comes_from_the_flag_else_the_environment(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert api_key_from_env("explicit") == "explicit"
    assert api_key_from_env(None) == "from-env"
    monkeypatch.delenv(API_KEY_ENV)
    assert api_key_from_env(None) is None
    monkeypatch.setenv(API_KEY_ENV, "")
    assert api_key_from_env("") is None
