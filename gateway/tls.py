"""Transport security for the gateway's gRPC port and its clients: TLS, and mutual TLS when
the gateway is given a CA to check client certificates against. `deploy/tls/self-signed.sh`
makes test material."""

from __future__ import annotations

from pathlib import Path

import grpc

from common.errors import InvalidRequestError


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidRequestError(what, f"cannot read {path}: {exc.strerror}") from None


def server_credentials(cert: str, key: str, client_ca: str = ""
                       ) -> grpc.ServerCredentials | None:
    """TLS with the PEM certificate chain and key at these paths (None: plaintext); with
    `client_ca`, clients must present a certificate that CA signed (mutual TLS)."""
    if not cert and not key:
        if client_ca:
            raise InvalidRequestError("tls_client_ca", "needs --tls-cert and --tls-key too")
        return None
    if not (cert and key):
        raise InvalidRequestError("tls_cert", "give both --tls-cert and --tls-key")
    pair = [(_read(key, "tls_key"), _read(cert, "tls_cert"))]
    if client_ca:
        return grpc.ssl_server_credentials(pair, _read(client_ca, "tls_client_ca"),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(pair)


def channel_credentials(ca: str = "", cert: str = "", key: str = ""
                        ) -> grpc.ChannelCredentials:
    """A client's TLS: trust `ca` (empty: the system's roots); present `cert`/`key` to a
    gateway that asks for client certificates."""
    if bool(cert) != bool(key):
        raise InvalidRequestError("tls_cert", "give both --tls-cert and --tls-key")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "tls_ca") if ca else None,
        private_key=_read(key, "tls_key") if key else None,
        certificate_chain=_read(cert, "tls_cert") if cert else None)
