"""Encrypted editor tokens as Confluence makes them, minted with jwcrypto (not the engine's code).

    jwe.py keygen DIR          RSA-3072 key pair: DIR/private.b64 (base64 PKCS#8 DER, the form of
                               confluence.cfg.xml), DIR/private.pem (PKCS#8), DIR/private-rsa.pem
                               (PKCS#1) and DIR/public.pem
    jwe.py wrap PUBLIC.pem [ALG [ENC]]
                               reads a JWT on stdin, prints it wrapped in a compact JWE
                               (default RSA-OAEP-256 + A256GCM, cty JWT)
"""
import base64
import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwcrypto import jwe, jwk


def keygen(directory: str) -> None:
    out = Path(directory)
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (out / "private.b64").write_text(base64.b64encode(der).decode())
    (out / "private.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (out / "private-rsa.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    (out / "public.pem").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )


def wrap(public_pem: str, alg: str, enc: str) -> None:
    key = jwk.JWK.from_pem(Path(public_pem).read_bytes())
    inner = sys.stdin.read().strip()
    header = {"alg": alg, "enc": enc, "cty": "JWT"}
    token = jwe.JWE(inner.encode(), protected=json.dumps(header))
    token.allowed_algs = [alg, enc]
    token.add_recipient(key)
    print(token.serialize(compact=True))


if __name__ == "__main__":
    if sys.argv[1] == "keygen":
        keygen(sys.argv[2])
    elif sys.argv[1] == "wrap":
        wrap(
            sys.argv[2],
            sys.argv[3] if len(sys.argv) > 3 else "RSA-OAEP-256",
            sys.argv[4] if len(sys.argv) > 4 else "A256GCM",
        )
    else:
        sys.exit(f"unknown command {sys.argv[1]!r}")
