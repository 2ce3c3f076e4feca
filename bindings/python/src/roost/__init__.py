"""roost: the roost client SDK for Python (end-to-end encrypted MLS groups on a roost homeserver).

Everything here is the UniFFI binding of the Rust crate roost-ffi (bindings/ in the roost
repository); docs/BINDINGS.md shows an example. The calls that talk to the homeserver or the
profile database are coroutines: await them on any asyncio event loop. The work itself runs on
the SDK's own threads, never on the event loop's.

Errors are one exception type, ``RoostError``, with a subclass per case (``RoostError.Server``
carries the wire error ``code`` and ``code_name``).
"""

from ._ffi import *  # noqa: F401,F403
from ._ffi import (  # noqa: F401  (the names apps use, for type checkers and readers)
    Device,
    Event,
    EventListener,
    ListenerError,
    MessageContent,
    OutgoingMessage,
    OutgoingState,
    RoostClient,
    RoostError,
    SendFailure,
    ServerConfig,
    Trust,
    add_device,
    open_profile,
    register,
)
