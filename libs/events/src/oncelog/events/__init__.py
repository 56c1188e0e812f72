"""oncelog's wire contract: the event schema, subjects, message ids and codecs."""

from oncelog.events.codec import (
    DEFAULT_SOURCE,
    MAX_EVENT_BYTES,
    REJECTION_CODES,
    Decoded,
    Rejected,
    decode_message,
    encode_event,
    from_ns,
    payload_error,
    utc,
)
from oncelog.events.schema import Event, EventId, IncomingEvent, Source, Topic
from oncelog.events.subjects import (
    DEFAULT_PREFIX,
    MAX_TOKEN_LEN,
    msg_id,
    subject_for,
    topic_error,
    topic_from_subject,
)

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_SOURCE",
    "MAX_EVENT_BYTES",
    "MAX_TOKEN_LEN",
    "REJECTION_CODES",
    "Decoded",
    "Event",
    "EventId",
    "IncomingEvent",
    "Rejected",
    "Source",
    "Topic",
    "decode_message",
    "encode_event",
    "from_ns",
    "msg_id",
    "payload_error",
    "subject_for",
    "topic_error",
    "topic_from_subject",
    "utc",
]
