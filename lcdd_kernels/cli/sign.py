"""lcdd sign: sign a carrier directory with an elliptic-curve private key (offline), and the
``--verify PUBLIC.pem`` option of every command that loads a carrier."""

from __future__ import annotations

import os

VERIFY_HELP = ("refuse the carrier unless it carries a signature (lcdd sign) by the private key of this PEM "
               "public key, over exactly its files")


def add_verify_argument(p) -> None:
    p.add_argument("--verify", default=None, metavar="PUBLIC.pem", help=VERIFY_HELP)


def register(sub) -> None:
    p = sub.add_parser("sign", help="sign a carrier directory (writes DIR/carrier.sig; check it with --verify)")
    p.add_argument("dir", metavar="CARRIER_DIR", help="carrier directory")
    p.add_argument("--key", required=True, metavar="PRIVATE.pem",
                   help="elliptic-curve private key in PEM (e.g. `openssl ecparam -name prime256v1 -genkey "
                        "-noout -out private.pem`)")
    p.add_argument("--password-env", default=None, metavar="VAR",
                   help="name of an environment variable holding the key's password, if it is encrypted")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..carriers.signing import sign_carrier

    password = None
    if args.password_env:
        if args.password_env not in os.environ:
            raise ValueError(f"--password-env {args.password_env}: that environment variable is not set")
        password = os.environ[args.password_env]
    try:
        sig = sign_carrier(args.dir, args.key, password=password)
    except ImportError as e:
        raise ValueError(str(e)) from None
    print(f"signed {args.dir}: {sig}")
    return 0
