"""What a failed Kafka connection check says: the setting that fixes it."""

from __future__ import annotations

import ssl

import pytest

from stream.kafka import _explain
from stream.settings import load_settings


def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    exc.verify_code, exc.verify_message = code, message
    return exc


@pytest.mark.parametrize(("code", "message"), [
    (62, "Hostname mismatch, certificate is not valid for 'kafka-1.internal'."),
    (64, "IP address mismatch, certificate is not valid for '192.0.2.2'."),
])
def test_a_certificate_for_another_host_names_the_bootstrap_not_the_ca(
        code: int, message: str) -> None:
    """The CA was right; it used to say to set SEGSTREAM_KAFKA_SSL_CAFILE."""
    text = str(_explain(load_settings(kafka_bootstrap="192.0.2.2:9093"),
                        _verify_error(code, message)))
    assert "SEGSTREAM_KAFKA_BOOTSTRAP" in text and "SSL_CAFILE" not in text
    assert message in text


def test_an_untrusted_certificate_names_the_ca_file() -> None:
    text = str(_explain(load_settings(kafka_bootstrap="127.0.0.1:9093"),
                        _verify_error(19, "self-signed certificate in certificate chain")))
    assert "SEGSTREAM_KAFKA_SSL_CAFILE" in text
