"""``remora certs``: make a cluster CA, issue member certificates, show what a certificate says.

``register`` stays cheap (the ``remora`` start-up is on the cold-start path); ``cryptography`` is
imported only when a sub-command runs.
"""
from __future__ import annotations

import argparse
import json

from remora.pki import CA_CERT, CA_KEY, CERT, KEY, ROLES

EPILOG = f"""\
examples:
  remora certs init --dir /etc/remora/ca --cluster prod
  remora certs issue --dir /etc/remora/ca --role scheduler --host-id sched-1 \\
      --dns sched-1.cluster.local --ip 10.0.0.5 --out /etc/remora/tls
  remora certs issue --dir /etc/remora/ca --role peer --host-id node-7 --ip 10.0.0.7 --out ./node-7
  remora certs show /etc/remora/tls/cert.pem

what a daemon needs: a directory with {CA_CERT} (the CA bundle it trusts), {CERT} (its certificate) and
{KEY} (its key, mode 0600). 'issue' writes exactly that into --out; copy it to the node (the key only
over a secure channel) and point the daemon at it. Keep the CA directory ({CA_KEY}) off the nodes.

roles: {', '.join(ROLES)}. The role and host id go into a URI SAN spiffe://remora/<cluster>/<role>/<host-id>
and into the subject (OU=<role>, CN=<host-id>).

using an existing CA instead: any PEM CA works. Either put its certificate and unencrypted key in a
directory as {CA_CERT} + {CA_KEY} and use 'remora certs issue --dir' with it, or issue member
certificates with your own tooling (subject OU=<role>, CN=<host-id>, EKU serverAuth+clientAuth, IP/DNS
SANs for the addresses clients dial) and give the daemons {CA_CERT} + {CERT} + {KEY}.

rotation: issue a new certificate into the same --out directory; running daemons pick it up for new
connections within seconds, open connections continue. See docs/pki.md.
"""


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if not 1 <= value <= 36500:
        raise argparse.ArgumentTypeError(f"days must be 1..36500, not {value}")
    return value


def register(sub) -> None:
    p = sub.add_parser("certs", help="cluster CA and member certificates for mutual TLS in the mesh",
                       description="Make a cluster CA, issue member certificates, show a certificate.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args: p.print_help() or 2)
    cmds = p.add_subparsers(dest="certs_command", metavar="ACTION")

    init = cmds.add_parser("init", help="create a cluster CA in a directory",
                           description=f"Create {CA_CERT} and {CA_KEY} (0600) in --dir (made 0700).")
    init.add_argument("--dir", required=True, help="directory of the CA")
    init.add_argument("--cluster", default="default", help="cluster name written into every certificate")
    init.add_argument("--days", type=_days, default=3650, help="validity of the CA (default 3650)")
    init.add_argument("--force", action="store_true", help="replace an existing CA (invalidates all members)")
    init.set_defaults(func=_init)

    issue = cmds.add_parser("issue", help="issue a member certificate signed by the CA",
                            description=f"Write {CA_CERT}, {CERT} and {KEY} (0600) into --out.")
    issue.add_argument("--dir", required=True, help=f"directory of the CA ({CA_CERT} + {CA_KEY})")
    issue.add_argument("--role", required=True, choices=ROLES, help="what the member does")
    issue.add_argument("--host-id", required=True, help="the member's host id (as the daemons use it)")
    issue.add_argument("--dns", action="append", default=[], metavar="NAME", help="DNS SAN (repeatable)")
    issue.add_argument("--ip", action="append", default=[], metavar="ADDR", help="IP SAN (repeatable)")
    issue.add_argument("--out", required=True, help="directory to write the member's files into")
    issue.add_argument("--days", type=_days, default=90, help="validity (default 90, never past the CA's)")
    issue.add_argument("--cluster", help="cluster name (default: the CA's)")
    issue.set_defaults(func=_issue)

    show = cmds.add_parser("show", help="show the certificates of a PEM file")
    show.add_argument("file", help="a PEM certificate or bundle")
    show.add_argument("--json", action="store_true", help="JSON instead of a table")
    show.set_defaults(func=_show)


def _init(args) -> int:
    from remora.pki import ca

    authority = ca.init_ca(args.dir, cluster=args.cluster, days=args.days, force=args.force)
    info = ca.describe(authority.cert)
    print(f"cluster CA '{authority.cluster}' created in {args.dir}: {CA_CERT} (give it to every member), "
          f"{CA_KEY} (0600, keep it off the nodes); expires {info['not_after']}")
    return 0


def _issue(args) -> int:
    from remora.pki import ca

    authority = ca.load_ca(args.dir, cluster=args.cluster)
    issued = authority.issue(args.role, args.host_id, dns=args.dns, ips=args.ip, days=args.days)
    ca.write_member(args.out, issued, authority.bundle_pem)
    info = ca.describe(issued.cert)
    print(f"issued {args.role} certificate for {args.host_id} (serial {info['serial']}, expires {info['not_after']}) "
          f"in {args.out}: {CA_CERT} {CERT} {KEY} (0600)")
    return 0


def _show(args) -> int:
    from remora.pki import ca

    certs = ca.load_certificates(ca.read_pem(args.file, "certificate"), args.file)
    infos = [ca.describe(c) for c in certs]
    if args.json:
        print(json.dumps(infos, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for n, info in enumerate(infos):
        table = Table(title=f"{args.file} [{n}]" if len(infos) > 1 else args.file, show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        left = "EXPIRED or not yet valid" if info["expired"] else f"{info['days_left']} days left"
        expiry = f"{info['not_after']} ({left})"
        for name, value in (("subject", info["subject"]), ("issuer", info["issuer"]),
                            ("role", info["role"] or "-"), ("host id", info["host_id"] or "-"),
                            ("cluster", info["cluster"] or "-"), ("CA", "yes" if info["ca"] else "no"),
                            ("SANs", "\n".join(info["sans"]) or "-"),
                            ("key usage", ", ".join(info["extended_key_usage"]) or "-"), ("key", info["key"]),
                            ("valid from", info["not_before"]), ("expires", expiry),
                            ("serial", info["serial"]), ("sha256", info["sha256"])):
            table.add_row(name, value)
        console.print(table)
    return 0
