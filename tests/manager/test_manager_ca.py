"""The manager as the cluster CA: joined members get certificates that remora.pki accepts."""
from __future__ import annotations

import pytest
from cryptography import x509
from manager_util import ManagerProcess

from remora.pki.ca import identity_from_pem, init_ca
from remora.plugins.manager.client import ManagerClient


def test_member_certificates_from_the_manager(db_url, tmp_path):
    ca = init_ca(tmp_path / "ca", cluster="edge")
    m = ManagerProcess(db_url, tmp_path, extra=["--ca-dir", str(tmp_path / "ca")])
    try:
        join = m.ok("POST", "/api/v1/join-tokens", json={"name": "n"})["token"]
        c = ManagerClient(m.url, join)
        out = c.certificate("peer", "node-7", tmp_path / "certs", ips=["127.0.0.1"], dns=["node-7.local"])
        pem = (tmp_path / "certs" / "cert.pem").read_bytes()
        who = identity_from_pem(pem)
        assert (who.host_id, who.role, who.cluster) == ("node-7", "peer", "edge")
        cert = x509.load_pem_x509_certificate(pem)
        cert.verify_directly_issued_by(ca.cert)  # signed by the cluster CA
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(i) for i in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        assert (tmp_path / "certs" / "key.pem").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "certs" / "ca.pem").read_bytes() == ca.bundle_pem
        assert out["not_after"] > 0
        # only member roles, valid names, bounded validity; a join token is required
        for bad in ({"role": "manager", "host_id": "x"}, {"role": "peer", "host_id": "../x"},
                    {"role": "peer", "host_id": "x", "days": 10_000}, {"role": "peer", "host_id": "x", "dns": ["a b"]}):
            r = c.http.post(m.url + "/api/v1/agent/certificate", json=bad, timeout=10)
            assert r.status_code == 422, (bad, r.text)
        assert m.call("POST", "/api/v1/agent/certificate", json={"role": "peer", "host_id": "x"}).status_code == 401
        audit = [(a["action"], a["target"]) for a in m.ok("GET", "/api/v1/audit")]
        assert ("certificate.issue", "peer:node-7") in audit
    finally:
        m.stop()


def test_manager_without_ca_says_so(manager):
    join = manager.ok("POST", "/api/v1/join-tokens", json={"name": "n"})["token"]
    with pytest.raises(ValueError, match="not a CA"):
        ManagerClient(manager.url, join).certificate("peer", "n1", "/nonexistent-never-written")
