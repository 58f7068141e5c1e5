"""Inside the test command a missing tool is a failure, not a skip: a machine without nginx
must not pass green with the tests that drive nginx unrun. The tools' paths are pointed at a
file that does not exist; nothing is uninstalled."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import harness
from tests.integration import tls_servers

MISSING = "/nonexistent/bin/nginx"


def failed(info: pytest.ExceptionInfo[BaseException]) -> str:
    """The message of a pytest.fail; a pytest.skip here is the bug these tests are about."""
    assert info.type is pytest.fail.Exception, f"not a failure: {info.type.__name__}"
    return str(info.value)


def test_a_missing_tool_fails_and_says_how_to_install_it() -> None:
    with pytest.raises(BaseException) as info:
        harness.require_tool(MISSING, "apt-get install nginx-light")
    message = failed(info)
    assert "nginx-light" in message and "scripts/check" in message


def test_a_present_tool_is_returned() -> None:
    assert harness.require_tool("/bin/sh", "unused") == "/bin/sh"


def test_the_nginx_upstream_of_the_proxy_tests_fails_without_nginx(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(harness, "NGINX_EXE", MISSING)
    with pytest.raises(BaseException) as info, harness.nginx("{port}"):
        pass
    assert "nginx" in failed(info)


def test_the_tls_nginx_upstream_fails_without_nginx(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tls_servers, "NGINX", MISSING)
    cert = tls_servers.CertFiles(cert=tmp_path / "c.pem", key=tmp_path / "k.pem")
    upstream = tls_servers.NginxTlsUpstream(tmp_path / "nginx", cert, version="TLSv1.3")
    with pytest.raises(BaseException) as info:
        upstream.start()
    assert "nginx" in failed(info)
