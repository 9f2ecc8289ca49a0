"""``multiturnseg worker`` argument checks (no model is loaded for these)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from MultiTurnSegLib.cli import build_parser
from MultiTurnSegLib.cli.worker_cmd import TOKEN_ENV, check_args
from MultiTurnSegLib.errors import InputError

from test_worker_support import REPO_ROOT, TINY_MODEL_JSON, _env


def _args(*argv) -> argparse.Namespace:
    return build_parser().parse_args(["worker", "--model", str(TINY_MODEL_JSON), *argv])


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.org", "10.0.0.1"])
def test_non_loopback_without_token_is_refused(host, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(InputError, match=f"refusing to listen on {host} without a token"):
        check_args(_args("--host", host))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.5"])
def test_loopback_needs_no_token(host, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert check_args(_args("--host", host)) is None


def test_token_sources(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    f = tmp_path / "tok"
    f.write_text("  a-long-enough-token-value \n")
    assert check_args(_args("--host", "0.0.0.0", "--token-file", str(f))) == "a-long-enough-token-value"
    assert check_args(_args("--host", "0.0.0.0", "--token", "another-long-token-value")) == "another-long-token-value"
    monkeypatch.setenv(TOKEN_ENV, "env-token-value-0123456789")
    assert check_args(_args("--host", "0.0.0.0")) == "env-token-value-0123456789"
    f.write_text("\n")
    with pytest.raises(InputError, match="empty"):
        check_args(_args("--token-file", str(f)))
    with pytest.raises(InputError, match="cannot read the token file"):
        check_args(_args("--token-file", str(tmp_path / "missing")))
    with pytest.raises(SystemExit):  # argparse: not both
        _args("--token", "a", "--token-file", str(f))


def test_other_argument_errors(tmp_path):
    with pytest.raises(InputError, match="go together"):
        check_args(_args("--ssl-certfile", str(TINY_MODEL_JSON)))
    with pytest.raises(InputError, match="TLS file not found"):
        check_args(_args("--ssl-certfile", str(tmp_path / "c.pem"), "--ssl-keyfile", str(tmp_path / "k.pem")))
    with pytest.raises(InputError, match="model description not found"):
        check_args(build_parser().parse_args(["worker", "--model", str(tmp_path / "none.json")]))
    with pytest.raises(InputError, match="--port"):
        check_args(_args("--port", "70000"))


def test_refusal_from_the_command_line():
    env = _env()
    p = subprocess.run(
        [sys.executable, "-m", "MultiTurnSegLib", "worker", "--model", str(TINY_MODEL_JSON), "--host", "0.0.0.0"],
        capture_output=True, text=True, env=env, cwd=str(REPO_ROOT), timeout=120,
    )
    assert p.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a token" in p.stderr
    assert "Traceback" not in p.stderr
    assert "torch" not in p.stderr
