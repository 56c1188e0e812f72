"""oncelog's wire contract: the event schema, subjects, message ids, codecs and the validator."""

from oncelog.events.codec import (
    DEFAULT_SOURCE,
    MAX_EVENT_BYTES,
    REJECTION_CODES,
    Decoded,
    Rejected,
    decode_message,
    encode_event,
    from_ns,
)
from oncelog.events.headers import parse_headers
from oncelog.events.schema import Event, EventId, IncomingEvent, Source, Topic
from oncelog.events.subjects import (
    DEFAULT_PREFIX,
    MAX_TOKEN_LEN,
    msg_id,
    parse_msg_id,
    pattern_error,
    subject_for,
    topic_error,
    topic_from_subject,
)
from oncelog.events.validate import (
    MAX_PAYLOAD_DEPTH,
    Problem,
    decode_event,
    decode_problem,
    event_problems,
    payload_problem,
    text_problem,
    timestamp_problem,
    to_utc,
)

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_SOURCE",
    "MAX_EVENT_BYTES",
    "MAX_PAYLOAD_DEPTH",
    "MAX_TOKEN_LEN",
    "REJECTION_CODES",
    "Decoded",
    "Event",
    "EventId",
    "IncomingEvent",
    "Problem",
    "Rejected",
    "Source",
    "Topic",
    "decode_event",
    "decode_message",
    "decode_problem",
    "encode_event",
    "event_problems",
    "from_ns",
    "msg_id",
    "parse_headers",
    "parse_msg_id",
    "pattern_error",
    "payload_problem",
    "subject_for",
    "text_problem",
    "timestamp_problem",
    "to_utc",
    "topic_error",
    "topic_from_subject",
]
