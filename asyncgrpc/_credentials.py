"""TLS credentials for secure ports, without grpcio."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

__all__ = ["ServerCredentials", "ssl_server_credentials"]


class ServerCredentials:
    """TLS settings of a secure port; make them with
    :func:`ssl_server_credentials`."""

    __slots__ = ("_spec",)

    def __init__(self, root_certificates: Optional[bytes],
                 pairs: Tuple[Tuple[bytes, bytes], ...],
                 require_client_auth: bool) -> None:
        self._spec = (root_certificates, pairs, require_client_auth)


def _pem(value: object, what: str) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise TypeError(f"{what} must be PEM bytes, not {type(value).__name__}")


def ssl_server_credentials(
    private_key_certificate_chain_pairs: Sequence[Tuple[bytes, bytes]],
    root_certificates: Optional[bytes] = None,
    require_client_auth: bool = False,
) -> ServerCredentials:
    """TLS credentials, with grpc.ssl_server_credentials's signature.

    Args:
        private_key_certificate_chain_pairs: ``(private_key, certificate_chain)``
            PEM pairs.
        root_certificates: PEM of the CAs that sign client certificates.
        require_client_auth: demand and verify a client certificate
            (needs ``root_certificates``).
    """
    pairs = tuple((_pem(key, "private key"), _pem(chain, "certificate chain"))
                  for key, chain in private_key_certificate_chain_pairs)
    if not pairs:
        raise ValueError("at least one (private_key, certificate_chain) pair is needed")
    root = None if root_certificates is None else _pem(root_certificates, "root certificates")
    if require_client_auth and root is None:
        raise ValueError("require_client_auth needs root_certificates")
    return ServerCredentials(root, pairs, bool(require_client_auth))
