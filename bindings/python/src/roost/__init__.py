"""roost: the roost client SDK for Python (end-to-end encrypted MLS groups on a roost homeserver).

Everything here is the UniFFI binding of the Rust crate roost-ffi (bindings/ in the roost
repository); docs/BINDINGS.md shows an example. The calls that talk to the homeserver or the
profile database are coroutines: await them on any asyncio event loop. The work itself runs on
the SDK's own threads, never on the event loop's.

Files: ``send_file`` and ``download`` take a ``ProgressListener`` (an object with
``on_progress(done, total)``, called on an SDK thread). Push: ``register_push`` with a
``PushTarget``, ``unregister_push``, ``push_info``.

Errors are one exception type, ``RoostError``, with a subclass per case (``RoostError.Server``
carries the wire error ``code`` and ``code_name``).
"""

from ._ffi import *  # noqa: F401,F403
from ._ffi import (  # noqa: F401  (the names apps use, for type checkers and readers)
    Attachment,
    Device,
    Event,
    EventListener,
    ListenerError,
    MessageContent,
    OutgoingMessage,
    OutgoingState,
    ProgressListener,
    PushInfo,
    PushTarget,
    RoostClient,
    RoostError,
    SendFailure,
    SentFile,
    ServerConfig,
    Trust,
    add_device,
    open_profile,
    register,
    web_push_target,
)
