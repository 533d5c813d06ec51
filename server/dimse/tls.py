"""DICOM TLS (PS3.15 Annex B.9, the BCP 195 profiles): TLS 1.2 or later, certificates on both
sides when ``[dimse] tls_require_client_certificate`` (mutual authentication), verified against
``tls_ca_certificates``."""

from __future__ import annotations

import ssl

from config.settings import DimseSettings


def server_context(dimse: DimseSettings) -> ssl.SSLContext:
    """The context of the TLS listener on ``[dimse] tls_port``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195: no TLS 1.0 / 1.1
    assert dimse.tls_certificate and dimse.tls_private_key  # checked by the settings
    context.load_cert_chain(dimse.tls_certificate, dimse.tls_private_key)
    if dimse.tls_ca_certificates:
        context.load_verify_locations(dimse.tls_ca_certificates)
        context.verify_mode = (
            ssl.CERT_REQUIRED if dimse.tls_require_client_certificate else ssl.CERT_OPTIONAL
        )
    return context


def client_context(dimse: DimseSettings) -> ssl.SSLContext:
    """The context of an association Hilum requests (C-MOVE to a peer with ``tls = true``):
    the peer's certificate must chain to ``tls_ca_certificates`` (or the system's CAs), and
    Hilum presents its own. Peers are configured by address, and modalities' certificates
    rarely name it, so the chain is verified but not the host name."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH,
        cafile=str(dimse.tls_ca_certificates) if dimse.tls_ca_certificates else None,
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    assert dimse.tls_certificate and dimse.tls_private_key
    context.load_cert_chain(dimse.tls_certificate, dimse.tls_private_key)
    return context
