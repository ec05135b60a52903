"""Why the bridge cannot listen where it was asked to, in one line a user can act on.

Port 5001 is KoboldCpp's (so that SillyTavern's default URL works), and many SillyTavern users run
KoboldCpp too; on Windows a port can also sit inside a range the system reserves for Hyper-V, WSL or
Docker (`netsh interface ipv4 show excludedportrange protocol=tcp`), which gives "access denied".
"""

from __future__ import annotations

import errno

from .errors import BridgeError

KOBOLDCPP_PORT = 5001
# errno values, with Windows' socket error numbers (WSAEADDRINUSE, WSAEACCES, WSAEADDRNOTAVAIL).
IN_USE = {errno.EADDRINUSE, 10048}
DENIED = {errno.EACCES, 10013}
NO_SUCH_ADDRESS = {errno.EADDRNOTAVAIL, 10049}


class PortUnavailable(BridgeError):
    code = "port_unavailable"


def explain(exc: OSError, host: str, port: int) -> PortUnavailable | None:
    """The error to show for a failed bind, or None when `exc` is not about listening."""
    code = getattr(exc, "winerror", None) or exc.errno
    if code in IN_USE:
        who = " (KoboldCpp uses it too)" if port == KOBOLDCPP_PORT else ""
        return PortUnavailable(f"port {port} is already in use{who}: stop that program, or run "
                               f"`st-bridge serve --port {port + 1}` and use that port in SillyTavern's URL")
    if code in DENIED:
        return PortUnavailable(f"port {port} may not be used here (a port Windows reserves, or one below "
                               f"1024 without admin rights): choose another with --port")
    if code in NO_SUCH_ADDRESS:
        return PortUnavailable(f"{host} is not an address of this machine: use --host 127.0.0.1 "
                               "(or 0.0.0.0 with --api-key to be reachable from other machines)")
    return None
